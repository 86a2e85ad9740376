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
from rloopd.history import ranges
from rloopd.home import Home
from rloopd.log import EventLog, NewEvent, new_id
from rloopd.memory.experiments import ExperimentsTable
from rloopd.memory.folded import FoldSnapshots, fold_history
from rloopd.memory.rundir import materialize_frozen, project_memory
from rloopd.runs import agent_files, parse_window, prompt_template
from rloopd.sandbox import allocate_uid


def fork_point(home: Home, parent: str, step: int) -> tuple[str, int]:
    """(stream, n) of the event the fork continues from; StepNotFound for a step not started or not decided.

    Index lookups (`EventLog.step_event`) along the parent's lineage, no scan: the cost is the same at any
    log size."""
    log = home.log
    lineage = ranges(log, parent)
    start = _first(log, lineage, "experiment.started", step + 1)
    cut = (start[0], start[1] - 1) if start is not None else (parent, log.head(parent)[0])
    prefix = lineage[:[s for s, _ in lineage].index(cut[0])] + [cut]
    if _first(log, prefix, "experiment.started", step) is None:
        raise StepNotFound(f"run {parent} has no step {step}")
    if _first(log, prefix, "experiment.decided", step) is None:
        raise StepNotFound(f"run {parent}: step {step} has not finished")
    return cut


def _first(log: EventLog, history: list[tuple[str, int | None]], type_: str, step: int) -> tuple[str, int] | None:
    """The first `type_` event of `step` in a history given as (stream, last n) ranges, root first."""
    for stream, until in history:
        n = log.step_event(stream, type_, step, until)
        if n is not None:
            return stream, n
    return None


def fork_run(home: Home, parent_ref: str, step: int, *, name: str | None = None, agent: str | None = None,
             program: Path | None = None, experiments: int | None = None, window: str | None = None,
             seed: int | None = None, request: str | None = None) -> str:
    """Create the fork (validating everything first) and return its run id."""
    from rloopd.agents import SESSION_KINDS, check_agent

    parent = home.log.resolve(parent_ref)
    stream, n = fork_point(home, parent, step)
    prefix = fold_history(home.log, stream, n)  # from the nearest snapshot: the same cost at any position
    state = prefix.state
    created = dict(state.created)
    if agent is not None:
        from rloopd.runs import check_space_for, judge_dir, lab_from_config

        check_agent(agent)
        lab = lab_from_config(created["config"], judge_dir(home, created))  # its space and files as recorded
        check_space_for(lab, agent, where=f"--agent {agent}: the search space of run {parent} "
                                          f"({lab.space or 'the lab default'})")
        if check_agent(agent) in SESSION_KINDS:  # the template recorded at the root run's creation, checked now
            from rloopd.agents.cmd import check_template

            prompt, template = prompt_template(home, created)
            if template is not None:
                check_template(template, f"{prompt} (recorded in run {parent})")
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
        batch=None, condition=None,  # a fork is not one of its parent's batch's repeats
        uid=allocate_uid({e.data["uid"] for e in home.log.runs() if e.data.get("uid") is not None}))
    if agent is not None:  # a new agent's script is read from the lab now, and recorded
        created["agent_files"] = agent_files(home, agent, Path(created["lab"]))
    events = [NewEvent("run.created", created, **({"id": request} if request else {}))]
    if program_blob is not None:  # the fork follows its own program file from now on
        events.append(NewEvent("program.changed", {"program_blob": program_blob, "source": "fork",
                                                   "path": str(program)}))
    FoldSnapshots(home.log).save_if_due(prefix, stream)  # a fold that read far leaves a snapshot for the next
    stored = home.log.append(run, events, expected_n=0, prev=head)
    prefix.add(stored)  # now the fork's own fold
    run_dir = home.run_dir(run)
    home.secure_run(run, created)
    home.snapshots.restore(state.best_commit, run_dir / "workspace")
    materialize_frozen(run_dir, created["manifest"], home.blobs)
    project_memory(run_dir, prefix.mem, home.blobs, prefix.results_tsv(created["metric"]))
    ExperimentsTable(home.log).set_position(f"rundir:{run}", prefix.state.position)  # what replay compares
    return run


def fork_summary(home: Home, run: str) -> dict[str, Any]:
    first = next(home.log.read(run, until_n=0)).data
    return {"run_id": run, "name": first["name"], "parent": first["parent"]}
