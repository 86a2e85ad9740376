"""`rloopd noise LAB`: how far a lab's metric moves between runs of the same code with other seeds.

Rerun noise is of the same order as many accepted gains, so a margin (`accept = "margin:X"`) or a re-run gate
(`accept = "rerun:K"`) should be chosen knowing it. This runs the lab's baseline (its workspace as it is) N
times, each with another training seed (the seeds replicas get: `runs.experiment_seed(created, 0, i)`),
exactly as the loop runs an experiment (the recorded frozen files, the sandbox, the runner), and reports the
mean, the sample standard deviation (sd), the extremes and a suggested margin of two sd. Between two runs
of the same code the difference has an sd of sd * sqrt(2), so a chance "gain" over 2 sd happens in about 8 %
of comparisons with a single run each (under `better` it happens in half of them).

It needs no daemon and writes nothing to any home: the runs happen in a scratch home under the system's
temporary directory (with its own data seed and hidden-split secret), which is removed afterwards.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rloopd import runs
from rloopd.errors import LabConfigError
from rloopd.home import Home
from rloopd.runner import run_experiment

MARGIN_SIGMAS = 2.0


@dataclass
class Noise:
    lab: str
    metric: str
    direction: str
    budget: str
    repeats: int
    seeds: list[int] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    ok: int = 0
    mean: float | None = None
    std: float | None = None  # sample standard deviation (n - 1), over the runs that completed
    min: float | None = None
    max: float | None = None
    suggested_margin: float | None = None  # MARGIN_SIGMAS standard deviations, two significant digits
    suggested_accept: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(noise: Noise) -> Noise:
    """Fill in the statistics of `noise.values` (those that completed)."""
    good = [v for v in noise.values if v is not None and math.isfinite(v)]
    noise.ok = len(good)
    if good:
        noise.mean = float(f"{statistics.fmean(good):.12g}")
        noise.min, noise.max = min(good), max(good)
    if len(good) >= 2:
        noise.std = float(f"{statistics.stdev(good):.12g}")
        margin = MARGIN_SIGMAS * noise.std
        noise.suggested_margin = float(f"{margin:.2g}") if margin > 0 else 0.0
        noise.suggested_accept = f"margin:{noise.suggested_margin:g}" if margin > 0 else "better"
    return noise


def measure(lab_dir: Path, repeats: int = 5, *, budget: str | None = None, seed: int = 0, sandbox: str = "auto",
            on_start: Callable[[int, int], None] | None = None, stop: threading.Event | None = None) -> Noise:
    """Run the lab's baseline `repeats` times with other seeds; raises LabConfigError on bad input before
    running anything, and runner.Interrupted when `stop` is set."""
    if repeats < 2:
        raise LabConfigError(f"--repeats {repeats}: needs 2 or more to measure a spread")
    scratch = Path(tempfile.mkdtemp(prefix="rloopd-noise-"))
    try:
        with Home.open(scratch / "home") as h:
            run = runs.create_run(h, Path(lab_dir), agent="random", experiments=0, budget=budget, seed=seed,
                                  name="noise", sandbox=sandbox)
            created = next(h.log.read(run, until_n=0)).data
            lab = runs.lab_from_config(created["config"], runs.judge_dir(h, created))
            noise = Noise(lab=str(Path(lab_dir).absolute()), metric=created["metric"],
                          direction=created["direction"], budget=created["budget"], repeats=repeats)
            for i in range(repeats):
                if on_start:
                    on_start(i, repeats)
                snapshot = h.path / "tmp" / run / f"noise-{i}"
                snapshot.mkdir(parents=True)
                h.snapshots.export(created["base_commit"], snapshot)
                exp = runs.experiment_for(h, run, created, lab, snapshot, 0, replica=i)
                try:
                    outcome = run_experiment(exp, stop)
                finally:
                    shutil.rmtree(snapshot, ignore_errors=True)
                if outcome.workdir is not None:
                    shutil.rmtree(outcome.workdir, ignore_errors=True)
                value = outcome.metrics.get(noise.metric) if outcome.status == "ok" else None
                noise.seeds.append(exp.seed)
                noise.statuses.append(outcome.status)
                noise.values.append(value if isinstance(value, int | float) else None)
            if on_start:
                on_start(repeats, repeats)
            return summarize(noise)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
