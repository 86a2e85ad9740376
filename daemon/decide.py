"""Accept or reject an experiment: a pure function of the best so far, the result and the lab's rule.

Rules (`accept` in rloop.toml): `better` (beats the best in the metric's direction), `margin:X` (beats it by
more than X, in the metric's own units), and `rerun:K`: a candidate that beats the best (or is the first
valid result) is run K more times with other seeds, as replicas 1..K of its step, and is kept only if every
replica completed and the mean over replicas 0..K still beats the best; the best then becomes that mean.
`decide` is the gate on replica 0 (for `rerun:K` the same as `better`); `decide_replicas` the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rloopd.errors import LabConfigError


@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str
    best_before: float | None
    best_after: float | None
    mean: float | None = None  # rerun:K: the mean over replicas 0..K (when all completed)
    replicas: tuple[float | None, ...] = ()  # rerun:K: the metric of each replica, 0..K


def parse_rule(rule: str) -> float:
    """The margin a rule demands: `better` and `rerun:K` are 0, `margin:X` is X (in the metric's own units)."""
    if rule == "better" or rerun_count(rule):
        return 0.0
    kind, _, value = rule.partition(":")
    if kind == "margin":
        try:
            margin = float(value)
        except ValueError:
            margin = -1.0
        if margin >= 0 and math.isfinite(margin):
            return margin
    raise LabConfigError(f"acceptance rule {rule!r}: use 'better', 'margin:X' with X >= 0 or 'rerun:K' with K >= 1")


MAX_RERUNS = 100


def rerun_count(rule: str) -> int:
    """K of a `rerun:K` rule (1 <= K <= MAX_RERUNS); 0 for any other rule."""
    kind, _, value = rule.partition(":")
    if kind == "rerun" and value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_RERUNS:
        return int(value)
    return 0


def decide(best: float | None, status: str, value: float | None, direction: str, rule: str = "better") -> Decision:
    """Keep the change when it completed and beats `best` by the rule's margin in the metric's direction.

    Example:
        decide(2.0, "ok", 1.9, "minimize", "margin:0.05")  # accepted: 1.9 <= 2.0 - 0.05
    """
    margin = parse_rule(rule)
    if status != "ok" or value is None or not math.isfinite(value):
        return Decision(False, f"status {status}", best, best)
    if best is None:
        return Decision(True, "first valid result", None, value)
    gain = best - value if direction == "minimize" else value - best
    if gain > margin or (margin == 0 and gain > 0):
        return Decision(True, f"better by {gain:.6g}", best, value)
    return Decision(False, "not better" if gain <= 0 else f"gain {gain:.6g} within margin {margin:g}", best, best)


def decide_replicas(best: float | None, results: list[tuple[str, float | None]], direction: str) -> Decision:
    """The verdict of `rerun:K` on a candidate whose replica 0 passed the gate: `results` are (status, value)
    of replicas 0..K. Kept only if every replica completed and their mean still beats `best`.

    Example:
        decide_replicas(2.0, [("ok", 1.7), ("ok", 2.2), ("ok", 2.3)], "minimize")  # rejected: mean 2.067
    """
    values = tuple(v if s == "ok" and v is not None and math.isfinite(v) else None for s, v in results)
    n = len(results)
    for replica, (status, _) in enumerate(results):
        if values[replica] is None:
            return Decision(False, f"replica {replica} of {n - 1}: status {status}", best, best, None, values)
    mean = float(f"{math.fsum(values) / n:.12g}")  # three runs of 1.9 have mean 1.9, not 1.8999999999999997
    if best is None:
        return Decision(True, f"first valid result (mean of {n} runs)", None, mean, mean, values)
    gain = best - mean if direction == "minimize" else mean - best
    if gain > 0:
        return Decision(True, f"mean of {n} runs better by {gain:.6g}", best, mean, mean, values)
    return Decision(False, f"mean of {n} runs {mean:.6g} not better (replica 0 was {values[0]:.6g})", best, best,
                    mean, values)
