"""Accept or reject an experiment: a pure function of the best so far, the result and the lab's rule."""

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


def parse_rule(rule: str) -> float:
    """The margin a rule demands: `better` is 0, `margin:X` is X (in the metric's own units)."""
    if rule == "better":
        return 0.0
    kind, _, value = rule.partition(":")
    if kind == "margin":
        try:
            margin = float(value)
        except ValueError:
            margin = -1.0
        if margin >= 0 and math.isfinite(margin):
            return margin
    raise LabConfigError(f"acceptance rule {rule!r}: use 'better' or 'margin:X' with X >= 0")


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
