"""Secrets reach the judge alone: a hostile train.py under another uid searches everywhere and finds nothing."""

from __future__ import annotations

import importlib.util
import os
import secrets as pysecrets
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import need_root
from tests.labfixtures import harness as h

DROP = "setpriv --reuid=65534 --regid=65534 --clear-groups"


def need_root_and_setpriv():
    """The children run as uid 65534: root and setpriv are needed (a skip on a laptop, a failure in CI)."""
    need_root()


def hidden_test_split(secrets: dict, cache) -> bytes:
    spec = importlib.util.spec_from_file_location("lab_data_for_test", h.ROOT / "frozen" / "data.py")
    data = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = data  # dataclasses look their module up
    spec.loader.exec_module(data)
    return data.load(h.SMALL_SOURCE, secrets["data_seed"], secrets["test_secret"], int(h.EVAL_BYTES), cache).test


@pytest.mark.parametrize("via", ["fd", "file"])
def test_hostile_child_under_another_uid_finds_no_secret(tmp_path, via):
    need_root_and_setpriv()
    secrets = {"data_seed": 7_000_000_000 + pysecrets.randbelow(10**9), "test_secret": pysecrets.token_hex(16)}
    cache = tmp_path / "cache"
    ws = h.workspace(tmp_path, h.fixture("snoop.py"))
    before = {p.name: p.read_bytes() for p in ws.iterdir()}
    scratch = Path(tempfile.mkdtemp(prefix="lab-scratch-"))  # outside pytest's 0700 tree: uid 65534 goes there
    scratch.chmod(0o755)
    # The judge's own environment holds a secret too, as a daemon's might: children must not see it.
    result, log, proc = h.run(ws, tmp_path, cache, "--sandbox", DROP, "--scratch", str(scratch), budget="steps:3", secrets=secrets,
                              secrets_via=via, env={"RLOOPD_TOKEN": secrets["test_secret"]})
    assert proc.returncode == 0, proc.stderr
    assert result["status"] == "ok", (result, log[-3000:])
    assert result["sealed"] is True

    # The search really ran, in both children, as another uid, and looked at the judge.
    assert "[train] uid=65534" in log and "[import] uid=65534" in log
    assert "judge-cmdline:" in log and "--secrets-" in log
    assert "judge-environ: '<PermissionError>'" in log

    needles = [secrets["test_secret"], str(secrets["data_seed"])]
    test_split = hidden_test_split(secrets, tmp_path / "other-cache")
    chunks = [test_split[i:i + 48].decode("latin-1") for i in range(0, len(test_split) - 48, 997)]
    for needle in needles:
        assert needle not in log, "a child found a secret"
        assert needle not in (tmp_path / "out" / "result.json").read_text()
    assert not any(c in log for c in chunks), "a child read the hidden test split"
    # Nothing in the workspace changed, and the scratch root the children wrote to is gone.
    assert {p.name: p.read_bytes() for p in ws.iterdir()} == before
    leftovers = os.listdir(scratch)
    shutil.rmtree(scratch)
    assert leftovers == []
    assert (cache.stat().st_mode & 0o777) == 0o700


def test_forward_children_cannot_write_into_the_saved_checkpoint(tmp_path):
    """The checkpoint the agent later sees is the judge's sealed copy, not a file a child could change."""
    need_root_and_setpriv()
    cache = tmp_path / "cache"
    ws = h.workspace(tmp_path, h.fixture("leak_checkpoint.py"))
    scratch = Path(tempfile.mkdtemp(prefix="lab-scratch-"))
    scratch.chmod(0o755)
    saved = tmp_path / "out" / "model.pt"
    try:
        result, log, proc = h.run(ws, tmp_path, cache, "--sandbox", DROP, "--scratch", str(scratch),
                                  "--save-model", str(saved), budget="steps:2")
    finally:
        shutil.rmtree(scratch)
    assert result["status"] == "ok", (result, log[-2000:])
    assert "[leak] refused: PermissionError" in log, "the attack ran and was refused"
    assert b"LEAK" not in saved.read_bytes() and saved.stat().st_mtime != 1234567.0
