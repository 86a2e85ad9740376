"""Evaluation: do not change, this is the fixed metric.

val_bpb is the mean cross-entropy, in bits, of the model's next-byte predictions over every position of
the validation split (each split is cut into windows of the model's declared context length; the first
byte of a split is never predicted, every other byte exactly once). test_bpb is the same on the hidden
test split. The log-softmax is computed here, in the judge, in float32, from the raw logits the forward
child returns; nothing the model reports about itself is used.

Causality probes are mixed in among the ordinary windows, in a shuffled order that depends on the secret:
a probe is a copy of a validation window whose bytes from a random position k on are replaced by the
bytes of another window. A causal model gives the same predictions at positions before k for both; a
model whose predictions move there looks ahead (or across the batch), and the experiment is invalid.
A probe and its original go to two different forward processes, so a model that remembers the windows
it has seen cannot answer a probe from its memory of the original.
The tolerance bounds what looking ahead could gain: at most PROBE_TOL nats per byte.
"""

from __future__ import annotations

import math

import torch

VOCAB = 256
EVAL_TOKENS = {"cpu": 16384, "cuda": 131072}  # tokens per forward batch
N_PROBES = 8
# The largest change of any log-probability (nats) before the probe point that passes. A model that
# looks ahead can gain at most this much per byte unseen; an honest model's noise is far below it.
PROBE_TOL = {"cpu": 1e-4, "cuda": 1e-3}


class Invalid(Exception):
    """The logits are unusable (NaN, infinities) or a probe caught the model looking ahead."""


def windows(data: bytes, t: int) -> list[tuple[int, int]]:
    """(start, length) of the windows that predict every byte of data after the first."""
    return [(s, min(t, len(data) - 1 - s)) for s in range(0, len(data) - 1, t)]


def log_probs(raw: bytes, b: int, t: int) -> torch.Tensor:
    logits = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(b, t, VOCAB)
    if not torch.isfinite(logits).all():
        raise Invalid("the model returned NaN or infinite logits")
    return torch.log_softmax(logits, dim=-1)


def score(ask, splits, context_len: int, rng, device: str) -> dict:
    """Send every window and probe through ask(part, inputs) -> raw float32 logits; return the metrics.

    rng orders the windows, picks the probes and splits the work in two parts: part 0 is asked first,
    then part 1, each of a fresh forward child, and a probe never shares a part with its original.
    Seed rng with something the model cannot know.
    """
    kind = "cuda" if device.startswith("cuda") else "cpu"
    items = []  # (split name, start, length, input bytes, probe point or None, part)
    for name, data in (("val", splits.val), ("test", splits.test)):
        t = max(1, min(context_len, len(data) - 1))
        items += [(name, s, n, data[s:s + n], None, rng.randrange(2)) for s, n in windows(data, t)]
    full = [it for it in items if it[2] == items[0][2] and it[2] >= 2]
    candidates = [it for it in full if it[0] == "val"]
    for orig in rng.sample(candidates, min(N_PROBES, len(candidates))):
        k = rng.randrange(1, orig[2])
        others = [it for it in full if it[3][k:] != orig[3][k:]]
        tail = rng.choice(others)[3][k:] if others else bytes((b + 1) % 256 for b in orig[3][k:])
        items.append(("probe", orig, orig[2], orig[3][:k] + tail, k, 1 - orig[5]))
    rng.shuffle(items)

    nll = {"val": 0.0, "test": 0.0}
    count = {"val": 0, "test": 0}
    kept: dict[int, torch.Tensor] = {}  # id of a probed window -> its log-probs
    probes: list[tuple[tuple, torch.Tensor, int]] = []
    probed = {id(it[1]) for it in items if it[0] == "probe"}
    groups: dict[tuple[int, int], list] = {}
    for it in items:
        groups.setdefault((it[5], it[2]), []).append(it)
    for (part, n), group in sorted(groups.items(), key=lambda kv: kv[0][0]):
        per_batch = min(len(group), max(1, EVAL_TOKENS[kind] // n))
        for i in range(0, len(group), per_batch):
            batch = group[i:i + per_batch]
            # Every batch of a length has the same shape (the last is padded with repeats), so an honest
            # model computes a probe and its original with the same kernels: bit for bit, usually.
            inputs = [it[3] for it in batch] + [group[0][3]] * (per_batch - len(batch))
            lp = log_probs(ask(part, inputs), per_batch, n)
            for j, (name, start, _, _, k, _) in enumerate(batch):
                if name == "probe":
                    probes.append((start, lp[j], k))
                    continue
                data = splits.val if name == "val" else splits.test
                target = torch.frombuffer(bytearray(data[start + 1:start + 1 + n]), dtype=torch.uint8).long()
                nll[name] += -lp[j].gather(1, target[:, None]).double().sum().item()
                count[name] += n
                if id(batch[j]) in probed:
                    kept[id(batch[j])] = lp[j].clone()
    worst = 0.0
    for orig, lp, k in probes:
        diff = (kept[id(orig)][:k] - lp[:k]).abs().max().item()
        worst = max(worst, diff)
        if not diff <= PROBE_TOL[kind]:
            raise Invalid(f"causality probe failed: log-probabilities before position {k} moved by {diff:.3g} "
                          f"when later bytes changed (the model looks ahead)")
    return {"val_bpb": nll["val"] / count["val"] / math.log(2),
            "test_bpb": nll["test"] / count["test"] / math.log(2),
            "probes": len(probes), "probe_max_diff": worst}
