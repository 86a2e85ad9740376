"""The random baseline: change one declared constant of train.py at a time (or all, `random:all`).

Each proposal is drawn from a generator seeded by (run seed, step, attempt), so the same run proposes
the same changes on every machine; the proposal is still recorded on `experiment.started` and never
re-derived on replay. Values are uniform in the declared range, log-uniform where declared, or one of the
declared choices; a value equal to the current one is drawn again, so every step changes something.
"""

from __future__ import annotations

import ast
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rloopd.errors import LabConfigError


@dataclass(frozen=True)
class Proposal:
    description: str
    category: str | None
    params: dict[str, Any]


def parse_agent(spec: str) -> str:
    """`random` (one parameter per step) or `random:all` (every parameter at once)."""
    if spec in ("random", "random:one"):
        return "one"
    if spec == "random:all":
        return "all"
    raise LabConfigError(f"--agent {spec!r}: this version knows 'random', 'random:all', 'optuna[:tpe|gp|cmaes|random]', "
                         "'codex', 'claude' and cmd:'COMMAND ...'")


def current_constants(source: str) -> dict[str, Any]:
    """Module-level `NAME = literal` assignments of a train.py."""
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return values


def draw(spec: Any, current: Any, rng: random.Random) -> Any:
    """A new value for one parameter, different from `current` when the space allows it."""
    for _ in range(50):
        value = _draw_once(spec, current, rng)
        if value != current:
            return value
    return value


def _draw_once(spec: Any, current: Any, rng: random.Random) -> Any:
    if spec.choices:
        return rng.choice(list(spec.choices))
    lo, hi = spec.low, spec.high
    integer = isinstance(current, int) and not isinstance(current, bool) and float(lo).is_integer() \
        and float(hi).is_integer()
    if spec.log:
        x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    else:
        x = rng.uniform(lo, hi)
    if integer:
        return int(round(x))
    return float(f"{x:.3g}")


def propose(params: dict[str, Any], source: str, mode: str, seed: int, step: int, attempt: int) -> Proposal:
    """The change for this step: which constants get which values, and a one-line description."""
    rng = random.Random(f"random:{seed}:{step}:{attempt}")
    current = current_constants(source)
    names = sorted(params)
    if not names:
        raise LabConfigError("rloop.toml: [params] is empty, so the random agent has nothing to change")
    chosen = [rng.choice(names)] if mode == "one" else names
    changes = {n: draw(params[n], current.get(n), rng) for n in chosen}
    description = ", ".join(f"{n} {current.get(n)!r} -> {v!r}" for n, v in changes.items())
    category = params[chosen[0]].category if mode == "one" else "multiple"
    return Proposal(description, category, changes)


def apply_proposal(train_py: Path, proposal: Proposal, set_constants: Any) -> None:
    """Rewrite the constants in train.py as a coding agent would edit them."""
    train_py.write_text(set_constants(train_py.read_text(), proposal.params))
