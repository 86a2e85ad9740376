"""Idea categories from a coding agent's diff and description (daemon/categories.py)."""

from __future__ import annotations

import pytest

from rloopd.categories import classify
from rloopd.lab import Param

PARAMS = {"LEARNING_RATE": Param(category="learning rate", low=1e-4, high=1e-1, log=True),
          "DEPTH": Param(category="depth", low=1, high=8)}
BASE = b'''"""A train.py."""
LEARNING_RATE = 0.01
DEPTH = 2
WARMUP_STEPS = 100
SEED_TAG = "x"


def train(ctx):
    return ctx.model(DEPTH)
'''


def edit(old: str, new: str) -> bytes:
    assert old.encode() in BASE
    return BASE.replace(old.encode(), new.encode())


@pytest.mark.parametrize("after,description,expected", [
    (edit("DEPTH = 2", "DEPTH = 4"), "go deeper", "depth"),                              # declared in [params]
    (edit("LEARNING_RATE = 0.01", "LEARNING_RATE = 0.02"), "", "learning rate"),
    (edit("WARMUP_STEPS = 100", "WARMUP_STEPS = 300"), "longer warmup", "schedule"),    # undeclared, by its name
    (edit("DEPTH = 2\nWARMUP_STEPS = 100", "DEPTH = 3\nWARMUP_STEPS = 50"), "", "multiple"),
    (edit("return ctx.model(DEPTH)", "return ctx.model(DEPTH, act='gelu')"), "swap the activation",
     "architecture"),                                                                    # code, not a constant
    (edit("return ctx.model(DEPTH)", "return ctx.model(DEPTH * 2)") .replace(b"DEPTH = 2", b"DEPTH = 3"),
     "", "architecture"),                                                                # code wins over constants
    (edit('SEED_TAG = "x"', 'SEED_TAG = "y"'), "add dropout to the blocks", "regularization"),  # words decide
    (edit('SEED_TAG = "x"', 'SEED_TAG = "y"'), "something", "other"),
    (BASE, "lower the learning rate (forgot to save)", "learning rate"),                  # nothing changed
    (b"def broken(:\n", "rewrote it", "other"),                                          # does not parse
])
def test_categories_from_the_diff_and_the_description(after, description, expected):
    assert classify({"train.py": BASE}, {"train.py": after}, description, PARAMS) == expected


def test_another_file_is_other_unless_the_description_says_and_the_lab_overrides():
    before = {"train.py": BASE, "data.py": b"X = 1\n"}
    after = {"train.py": BASE, "data.py": b"X = 2\n"}
    assert classify(before, after, "tweak the loader", PARAMS) == "other"
    assert classify(before, after, "tweak the loader's batch size", PARAMS) == "batch size"
    changed = {"train.py": edit("WARMUP_STEPS = 100", "WARMUP_STEPS = 1")}
    assert classify({"train.py": BASE}, changed, "", PARAMS, {"WARMUP_STEPS": "optimizer"}) == "optimizer"
    assert classify(before, after, "tweak the loader", PARAMS, {"loader": "context"}) == "context"
