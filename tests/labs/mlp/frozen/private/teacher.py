"""The mlp lab's data source (private: never shown to the agent): a hidden random teacher labels Gaussian inputs.

A two-layer tanh network with random weights, drawn from the data seed, maps 16 standard-normal features to
4 class scores; an example's label is the argmax. The training and validation inputs are drawn from the
data seed, the hidden test inputs from the data seed and the test secret together, so the test split is
one no earlier run (and no agent) has seen.
"""

from __future__ import annotations

import hashlib

import numpy as np

FEATURES = 16  # inputs per example
CLASSES = 4  # labels 0..3
HIDDEN = 24  # the teacher's hidden units


def _rng(*words: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(str(w) for w in words).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def teacher(data_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = _rng("teacher", data_seed)
    w1 = rng.standard_normal((FEATURES, HIDDEN)) * (2.0 / np.sqrt(FEATURES))
    b1 = rng.standard_normal(HIDDEN) * 0.5
    w2 = rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN)
    return w1, b1, w2


def label(weights: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    w1, b1, w2 = weights
    return np.argmax(np.tanh(x.astype(np.float64) @ w1 + b1) @ w2, axis=1).astype(np.uint8)


def inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.standard_normal((n, FEATURES)).astype(np.float32)


def splits(data_seed: int, test_secret: str, train_size: int, eval_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train" | "val" | "test": (inputs float32 (n, FEATURES), labels uint8 (n,))}."""
    weights = teacher(data_seed)
    out = {}
    for name, rng, n in (("train", _rng("train", data_seed), train_size), ("val", _rng("val", data_seed), eval_size),
                         ("test", _rng("test", data_seed, test_secret), eval_size)):
        x = inputs(rng, n)
        out[name] = (x, label(weights, x))
    return out
