"""The model-based baseline: Optuna's samplers over the lab's `[params]`, by ask-and-tell, one proposal per step.

Specs: `optuna` (= `optuna:tpe`), `optuna:tpe`, `optuna:gp` (Gaussian process; needs torch, the `lab` extra),
`optuna:cmaes` (CMA-ES, via the `cmaes` package) and `optuna:random`. Like the random agent, it opens no
sessions: each step it asks for one configuration of every declared parameter, writes those values into the
best commit's files with `set_constants`, and the loop runs that as the step's experiment.

The study lives in the log, not in memory. Each step builds a fresh in-memory study from the run's history:
every finished proposal (replica 0) before this step is told, an `ok` one with its metric (under `rerun:K`
the mean over its replicas), a crashed, oom, timeout or invalid one as a failed trial; an interrupted
attempt is not told (its retry is). A trial's parameters are those the step recorded on `experiment.started`;
a declared parameter it does not name (the baseline, or a step of another agent before a fork) is read from
the files of that step's commit. Then one `ask` gives the suggestion, which is logged on `experiment.started` with the study it came from
(`suggested_by`, `study`: sampler, seed, trials told) and never re-derived: replay reads the log, and a
retried attempt reuses its recorded parameters.

Determinism: the suggestion is a function of (run seed, history, step, attempt). The sampler's seed is drawn
from (seed, step, attempt); TPE, GP and random are stateless given the trials (`add_trial`), and CMA-ES, whose
state is a trajectory, is rebuilt by replaying the history in order (each trial enqueued with its recorded
values, asked, told), which updates the CMA state exactly as an uninterrupted study that was told the same
trials would. So a daemon restart or a fork, which rebuild the same history from the log, suggest what an
uninterrupted run would have suggested (tests/test_optuna_agent.py kills a daemon mid-run to check it), and two
machines with the same seed suggest the same changes (for `optuna:gp`, as far as torch's floating point
agrees between them). `optuna:gp` loads torch into the process that asks (the daemon).

Values: a float is rounded to 4 significant digits (clamped to its range), an integer range gives integers
(when the constant is an int and the bounds are whole), `choices` are categorical; `log = true` samples on
the log scale. The category is that of the one parameter whose value changes, `multiple` when several do.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from rloopd.errors import LabConfigError
from rloopd.lab import Param, read_constants, set_constants

SAMPLERS = ("tpe", "gp", "cmaes", "random")
_NEEDS = {"gp": ("torch", "scipy"), "cmaes": ("cmaes",)}


@dataclass(frozen=True)
class Told:
    """One finished proposal of the history: its full parameters and its metric (None: it failed)."""

    step: int
    params: dict[str, Any]
    value: float | None


@dataclass(frozen=True)
class Suggestion:
    description: str
    category: str | None
    params: dict[str, Any]
    suggested_by: str  # "optuna:tpe"
    study: dict[str, Any]  # what the suggestion was asked of: sampler, seed, trials told, failed


def parse_agent(spec: str) -> str:
    """The sampler of an `optuna[:SAMPLER]` spec; LabConfigError naming the known ones, or a missing package."""
    kind, colon, sampler = spec.partition(":")
    if kind != "optuna":
        raise LabConfigError(f"--agent {spec!r}: not an optuna spec")
    sampler = sampler if colon else "tpe"
    if sampler not in SAMPLERS:
        raise LabConfigError(f"--agent {spec!r}: unknown optuna sampler {sampler!r}; use one of "
                             + ", ".join(f"optuna:{s}" for s in SAMPLERS))
    for module in ("optuna", *_NEEDS.get(sampler, ())):
        if importlib.util.find_spec(module) is None:
            extra = " (pip install 'rloopd[lab]')" if module == "torch" else ""
            raise LabConfigError(f"--agent {spec!r}: needs the Python package {module!r}, which is not installed{extra}")
    return sampler


# --- the search space and the history --------------------------------------------------------------


def _in_workspace(param: Param) -> str:
    """The param's file inside a workspace snapshot (rloop.toml names it from the lab root)."""
    path = PurePosixPath(param.file)
    return str(path.relative_to("workspace")) if path.parts[:1] == ("workspace",) else str(path)


def distributions(params: dict[str, Param], current: dict[str, Any]) -> dict[str, Any]:
    """Optuna distributions of the declared params, in name order; `current` (the constants as they are
    now) decides whether a range is of integers, as the random agent decides it."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name in sorted(params):
        p = params[name]
        if p.choices is not None:
            out[name] = CategoricalDistribution(list(p.choices))
            continue
        now = current.get(name)
        integer = isinstance(now, int) and not isinstance(now, bool) and float(p.low).is_integer() \
            and float(p.high).is_integer()
        out[name] = IntDistribution(int(p.low), int(p.high), log=p.log) if integer \
            else FloatDistribution(float(p.low), float(p.high), log=p.log)
    return out


def _fits(dist: Any, value: Any) -> Any:
    """`value` as `dist` holds it, or raise ValueError when it is not in the distribution."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if choice == value and type(choice) is type(value):
                return choice
        for choice in dist.choices:  # 64 and 64.0 are the same choice
            if choice == value and not isinstance(value, bool) and not isinstance(choice, bool):
                return choice
        raise ValueError(f"{value!r} is not one of {dist.choices}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(dist, IntDistribution):
        if float(value) != int(value):
            raise ValueError(f"{value!r} is not an integer")
        value = int(value)
    else:
        value = float(value)
    if not dist.low <= value <= dist.high:
        raise ValueError(f"{value!r} is outside [{dist.low}, {dist.high}]")
    return value


_CONSTANTS: dict[tuple[str, str], dict[str, Any]] = {}  # (commit, file) -> its constants (commits never change)


def constants_at(snapshots: Any, commit: str, params: dict[str, Param]) -> dict[str, Any]:
    """The declared params' values in a workspace commit's files."""
    values: dict[str, Any] = {}
    for file in sorted({_in_workspace(p) for p in params.values()}):
        key = (commit, file)
        if key not in _CONSTANTS:
            if len(_CONSTANTS) > 50_000:
                _CONSTANTS.clear()
            try:
                _CONSTANTS[key] = read_constants(snapshots.read(commit, file).decode())
            except Exception:  # a file the commit lacks, or one that does not parse: no values from it
                _CONSTANTS[key] = {}
        values.update(_CONSTANTS[key])
    return {n: values[n] for n in params if n in values}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def history(rows: Iterable[dict[str, Any]], dists: dict[str, Any], before: int,
            filled: Callable[[str], dict[str, Any]]) -> list[Told]:
    """The finished proposals of steps before `before`, in step order, with every declared parameter
    (`filled(commit)` gives those a step did not record) and its metric: replica 0's, or under `rerun:K` the
    mean over the step's replicas that completed (what the rule judged, not a lucky first run); a proposal
    that did not complete is a failed trial. A step whose values fall outside today's space is left out."""
    rows = [r for r in rows if r["step"] < before and r["status"] not in ("running", "interrupted")]
    replicas: dict[int, list[float]] = {}
    for r in rows:
        if r["replica"] > 0 and r["status"] == "ok" and _number(r["value"]) is not None:
            replicas.setdefault(r["step"], []).append(_number(r["value"]))
    told = []
    for r in sorted((r for r in rows if r["replica"] == 0), key=lambda r: r["step"]):
        params = json.loads(r["params"] or "{}") if isinstance(r["params"], str) else dict(r["params"] or {})
        missing = [n for n in dists if n not in params]
        if missing:
            at = filled(r["commit"])
            params.update({n: at[n] for n in missing if n in at})
        try:
            values = {n: _fits(d, params[n]) for n, d in dists.items()}
        except (KeyError, ValueError):
            continue
        value = _number(r["value"]) if r["status"] == "ok" else None
        if value is not None and r["step"] in replicas:
            runs = [value, *replicas[r["step"]]]
            value = float(f"{math.fsum(runs) / len(runs):.12g}")
        told.append(Told(r["step"], values, value))
    return told


# --- asking ----------------------------------------------------------------------------------------


def sampler_seed(seed: int, step: int, attempt: int) -> int:
    return int.from_bytes(hashlib.sha256(f"optuna:{seed}:{step}:{attempt}".encode()).digest()[:4], "big")


@functools.cache
def _quiet() -> None:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the daemon logs what it does; optuna's chatter is noise
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", module=r"optuna(\.|$)")


def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def suggest(sampler: str, dists: dict[str, Any], told: list[Told], direction: str, seed: int) -> dict[str, Any]:
    """Build a fresh study of `told` under a sampler seeded with `seed` and ask it for one configuration."""
    import optuna
    from optuna.trial import TrialState, create_trial

    _quiet()
    study = optuna.create_study(direction=direction, sampler=_sampler(sampler, seed))
    if sampler == "cmaes":  # its state is a trajectory: replay it, trial by trial, in order
        for t in told:
            study.enqueue_trial(t.params)
            trial = study.ask(dists)
            trial.relative_params  # noqa: B018 (what a free ask does: CMA-ES takes in the last generation)
            if t.value is None:
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, t.value)
    else:
        study.add_trials([create_trial(params=t.params, distributions=dists, value=t.value) if t.value is not None
                          else create_trial(params=t.params, distributions=dists, state=TrialState.FAIL)
                          for t in told])
    trial = study.ask(dists)
    out = {}
    for name, dist in dists.items():
        value = trial.params[name]
        if isinstance(dist, optuna.distributions.FloatDistribution):
            value = min(max(float(f"{value:.4g}"), dist.low), dist.high)
        out[name] = value
    return out


def _current(workspace_root: Path, params: dict[str, Param]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for file in sorted({p.file for p in params.values()}):
        values.update(read_constants((workspace_root / file).read_text()))
    return values


def propose(sampler: str, params: dict[str, Param], run_dir: Path, rows: Iterable[dict[str, Any]],
            snapshots: Any, created: dict[str, Any], step: int, attempt: int) -> Suggestion:
    """This step's suggestion: the run's history told to a fresh study, one ask (see the module docstring).
    `run_dir` holds the workspace at the best commit (the values a suggestion changes from)."""
    if not params:
        raise LabConfigError("rloop.toml: [params] is empty, so the optuna agent has nothing to change")
    current = _current(run_dir, params)
    dists = distributions(params, current)
    told = history(rows, dists, step, lambda commit: constants_at(snapshots, commit, params))
    seed = sampler_seed(int(created.get("seed", 0)), step, attempt)
    values = suggest(sampler, dists, told, created.get("direction", "minimize"), seed)
    changed = [n for n in values if not (n in current and current[n] == values[n]
                                         and type(current[n]) is type(values[n]))]
    spec = f"optuna:{sampler}"
    if changed:
        description = ", ".join(f"{n} {current.get(n)!r} -> {values[n]!r}" for n in changed)
    else:
        description = f"no change: {spec} suggests the best's values again"
    category = params[changed[0]].category if len(changed) == 1 else ("multiple" if changed else None)
    study = {"sampler": sampler, "seed": seed, "trials": sum(t.value is not None for t in told),
             "failed": sum(t.value is None for t in told)}
    return Suggestion(description, category, values, spec, study)


def apply(run_dir: Path, params: dict[str, Param], values: dict[str, Any]) -> None:
    """Write the suggested values into their files (the workspace, at the best commit), as an agent would."""
    by_file: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        by_file.setdefault(params[name].file if name in params else "workspace/train.py", {})[name] = value
    for file, changes in sorted(by_file.items()):
        path = run_dir / file
        path.write_text(set_constants(path.read_text(), changes))
