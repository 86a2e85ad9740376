"""Forking a run at a step: a new run whose history is its parent's prefix plus its own events.

The fork position is the parent's last event before step STEP+1 started (or its last event, when STEP is
the latest). The fork's `run.created` names the parent and that position, its chain continues from the
hash of the event there, its workspace is the best commit as of that position (also when STEP itself was
rejected), and its first experiment is STEP+1. Nothing of the parent is copied or changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rloopd.errors import LabConfigError, StepNotFound
from rloopd.history import history
from rloopd.home import Home
from rloopd.log import NewEvent, new_id
from rloopd.memory.rundir import materialize_frozen
from rloopd.memory.state import fold
from rloopd.runs import parse_window
from rloopd.sandbox import allocate_uid


def fork_point(home: Home, parent: str, step: int) -> tuple[str, int]:
    """(stream, n) of the event the fork continues from; StepNotFound for a step not started or not decided."""
    events = history(home.log, parent)
    cut = next((i for i, e in enumerate(events) if e.type == "experiment.started" and e.data["step"] == step + 1),
               len(events))
    prefix = events[:cut]
    if not any(e.type == "experiment.started" and e.data["step"] == step for e in prefix):
        raise StepNotFound(f"run {parent} has no step {step}")
    if not any(e.type == "experiment.decided" and e.data["step"] == step for e in prefix):
        raise StepNotFound(f"run {parent}: step {step} has not finished")
    last = prefix[-1]
    return last.stream, last.n


def fork_run(home: Home, parent_ref: str, step: int, *, name: str | None = None, agent: str | None = None,
             program: Path | None = None, experiments: int | None = None, window: str | None = None,
             seed: int | None = None, request: str | None = None) -> str:
    """Create the fork (validating everything first) and return its run id."""
    from rloopd.agents.random_search import parse_agent

    parent = home.log.resolve(parent_ref)
    stream, n = fork_point(home, parent, step)
    prefix = history(home.log, stream, until_n=n)
    state = fold(prefix)
    created = dict(state.created)
    if agent is not None:
        parse_agent(agent)
    if experiments is not None and experiments < 0:
        raise LabConfigError(f"--experiments {experiments}: must be 0 or more")
    if name and any(e.data.get("name") == name for e in home.log.runs()):
        raise LabConfigError(f"--name {name!r}: a run with that name exists already")
    program_blob = None
    if program is not None:
        program = Path(program).absolute()
        try:
            program_blob = home.blobs.put(program.read_bytes())
        except OSError as e:
            raise LabConfigError(f"--program {program}: cannot read it ({e.strerror})") from None
    cap = created.get("experiments")
    more = experiments if experiments is not None else (None if cap is None else max(cap - step, 0))
    run = new_id()[:12]
    head = home.log.conn.execute("SELECT hash FROM events WHERE stream = ? AND n = ?", (stream, n)).fetchone()[0]
    created.update(
        name=name or f"{created['name']}-fork{step}-{run[:4]}", agent=agent or created["agent"],
        experiments=None if more is None else step + more,
        window_seconds=parse_window(window) if window is not None else created.get("window_seconds"),
        seed=created.get("seed", 0) if seed is None else seed, base_commit=state.best_commit,
        program_blob=state.program_blob, parent={"run": stream, "n": n, "step": step},
        uid=allocate_uid({e.data["uid"] for e in home.log.runs() if e.data.get("uid") is not None}))
    events = [NewEvent("run.created", created, **({"id": request} if request else {}))]
    if program_blob is not None:  # the fork follows its own program file from now on
        events.append(NewEvent("program.changed", {"program_blob": program_blob, "source": "fork",
                                                   "path": str(program)}))
    home.log.append(run, events, expected_n=0, prev=head)
    run_dir = home.run_dir(run)
    home.snapshots.restore(state.best_commit, run_dir / "workspace")
    materialize_frozen(run_dir, created["manifest"], home.blobs)
    return run


def fork_summary(home: Home, run: str) -> dict[str, Any]:
    first = next(home.log.read(run, until_n=0)).data
    return {"run_id": run, "name": first["name"], "parent": first["parent"]}
