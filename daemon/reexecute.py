"""Re-execute recorded experiments: the reproducibility check an auditor wants.

Each chosen experiment is run again from its recorded commit, under the frozen files recorded at the run's
creation (the judge's copy is rebuilt from blobs and checked against the manifest), with the step's recorded
seed and the number of training steps the original run reported (`steps:N`, so a time budget becomes a step
budget and a faster or slower machine trains the same amount). Nothing is appended to the log: a
re-execution is a reading of it. The result is recorded against re-measured metric, the difference, and
whether it is within the tolerance (and the status is the same).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rloopd import runs
from rloopd.errors import RloopdError, StepNotFound
from rloopd.history import history
from rloopd.home import Home
from rloopd.memory.state import fold
from rloopd.runner import run_experiment

DEFAULT_TOLERANCE = 0.01  # absolute, in the lab's metric (0.01 bpb for the reference lab)


class BadSteps(RloopdError):
    pass


@dataclass
class Reexecution:
    step: int
    replica: int
    attempt: int
    commit: str
    budget: str
    recorded_status: str
    status: str
    recorded: float | None
    measured: float | None
    difference: float | None
    reproduced: bool
    reason: str | None = None


def recorded_experiments(events: list) -> dict[int, dict[str, Any]]:
    """step -> {started, finished, decided} of the proposal (replica 0), its last attempt not interrupted."""
    started = {(e.data["step"], e.data.get("replica", 0), e.data.get("attempt", 0)): e.data
               for e in events if e.type == "experiment.started"}
    found: dict[int, dict[str, Any]] = {}
    for e in events:
        d = e.data
        if e.type == "experiment.finished" and d.get("replica", 0) == 0 and d["status"] != "interrupted":
            key = (d["step"], 0, d.get("attempt", 0))
            if key in started:
                found[d["step"]] = {"started": started[key], "finished": d, "decided": None}
        elif e.type == "experiment.decided" and d["step"] in found:
            found[d["step"]]["decided"] = d
    return found


def parse_steps(spec: str, recorded: dict[int, dict[str, Any]], run: str) -> list[int]:
    """`0,5,9`, ranges `3-6`, `accepted`, `best` or `all`, over the steps the run finished."""
    spec = spec.strip()
    if spec == "all":
        return sorted(recorded)
    if spec == "accepted":
        return sorted(s for s, r in recorded.items() if r["decided"] and r["decided"]["accepted"])
    if spec == "best":
        accepted = [s for s, r in recorded.items() if r["decided"] and r["decided"]["accepted"]]
        return [max(accepted)] if accepted else []
    steps: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise BadSteps(f"--reexecute {spec!r}: use step numbers (0,5,9), ranges (3-6), accepted, best "
                           f"or all") from None
        steps.extend(range(a, b + 1))
    for s in steps:
        if s not in recorded:
            raise StepNotFound(f"--reexecute: run {run} has no finished step {s}")
    return sorted(set(steps))


def reexecute(home: Home, run: str, spec: str, tolerance: float = DEFAULT_TOLERANCE,
              on_start: Callable[[int, int, int], None] | None = None,
              stop: threading.Event | None = None) -> list[Reexecution]:
    """Run the chosen steps again and compare; raises BadSteps/StepNotFound before running anything."""
    if not tolerance >= 0:
        raise BadSteps(f"--tolerance {tolerance}: must be 0 or more")
    events = history(home.log, run)
    state = fold(events)
    created = state.created
    recorded = recorded_experiments(events)
    steps = parse_steps(spec, recorded, run)
    runs.check_manifest(home, created)  # the judge's copy is the recorded frozen files, byte for byte
    lab = runs.lab_from_config(created["config"], runs.judge_dir(home, created))
    metric = created.get("metric", "val_bpb")
    results = []
    for i, step in enumerate(steps):
        if on_start:
            on_start(i, len(steps), step)
        rec = recorded[step]
        started, finished = rec["started"], rec["finished"]
        trained = finished["metrics"].get("train_steps")
        budget = f"steps:{int(trained)}" if isinstance(trained, int | float) and trained > 0 else created["budget"]
        snapshot = home.path / "tmp" / run / f"reexecute-{step}"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
        try:
            home.snapshots.export(started["commit"], snapshot)
            warm = started.get("warm_start_blob")  # the checkpoint it was offered, if it was (and is kept)
            cold = bool(warm) and not home.blobs.exists(warm)
            exp = runs.experiment_for(home, run, created, lab, snapshot, step, budget=budget,
                                      warm_start=None if cold or not warm else warm)
            outcome = run_experiment(exp, stop)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)
        if outcome.workdir is not None:
            shutil.rmtree(outcome.workdir, ignore_errors=True)
        before, after = finished["metrics"].get(metric), outcome.metrics.get(metric)
        diff = None if before is None or after is None else round(after - before, 9)
        same_status = outcome.status == finished["status"]
        reproduced = same_status and (diff is None and before is None and after is None
                                      or diff is not None and abs(diff) <= tolerance)
        note = None if same_status else outcome.reason
        if cold:
            note = "; ".join(filter(None, [note, f"its warm-start checkpoint {warm[:12]} was collected: ran cold"]))
        results.append(Reexecution(step, 0, started.get("attempt", 0), started["commit"], budget,
                                   finished["status"], outcome.status, before, after, diff, reproduced, note))
    return results


def as_dicts(results: list[Reexecution]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
