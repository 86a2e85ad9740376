"""A run's history: its parent's prefix (for a fork, recursively) followed by its own events.

Nothing is copied when a run is forked: the fork's `run.created` names the parent and the position it
continues from, and every reader that folds a run folds this history.
"""

from __future__ import annotations

from rloopd.log import Event, EventLog
from rloopd.memory.folded import fold_history
from rloopd.memory.state import RunState


def history(log: EventLog, run: str, until_n: int | None = None) -> list[Event]:
    """The events that make up `run` (its own up to `until_n`), the parent's prefix first."""
    own = list(log.read(run, until_n=until_n))
    if not own or own[0].type != "run.created" or not own[0].data.get("parent"):
        return own
    parent = own[0].data["parent"]
    return history(log, parent["run"], until_n=parent["n"]) + own


def run_state(log: EventLog, run: str, until_n: int | None = None) -> RunState:
    """The state the fold of the run's history gives, started from the nearest fold snapshot."""
    return fold_history(log, run, until_n).state


def ranges(log: EventLog, run: str) -> list[tuple[str, int | None]]:
    """The history of `run` as (stream, last n in it) from the root: None for the run's own, to its end."""
    return [(x["run"], x["n"]) for x in lineage(log, run)] + [(run, None)]


def lineage(log: EventLog, run: str) -> list[dict]:
    """[{run, step}] from the root to `run`'s parent: where each fork came from."""
    first = next(log.read(run, until_n=0), None)
    parent = first.data.get("parent") if first is not None else None
    if not parent:
        return []
    return [*lineage(log, parent["run"]), {"run": parent["run"], "step": parent["step"], "n": parent["n"]}]
