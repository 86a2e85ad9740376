"""Batches: a question, conditions, repeats and evaluation criteria; every run of them created at once.

A batch file (TOML, validated with pydantic; paths relative to the file)::

    question = "Does TPE beat random search on the CPU lab?"
    lab = "."                      # the default lab of every condition
    repeats = 5                    # runs per condition, seeds seed, seed+1, ...
    seed = 0
    budget = "steps:200"           # per experiment (default: the lab's)
    experiments = 20               # cap per run (default: none, the window decides)
    window = "30m"                 # active time per run (optional)
    sandbox = "auto"

    [criteria]
    metric = "val_bpb"             # must be every lab's metric (default: the labs' own, if they agree)
    baseline = "random"            # the condition the others are compared with
    statistic = "median"           # of each run's final best: median or mean

    [[conditions]]
    name = "random"
    agent = "random"

    [[conditions]]
    name = "tpe"
    agent = "optuna:tpe"
    program = "programs/tpe.md"    # optional: a program file other than the lab's; also lab, budget,
                                   # experiments, window, memory, space per condition
    memory = "notes"               # the memory policy: notes, none, results-only, from:RUN[@STEP]
    space = "hparams"              # a search space preset of the lab's [spaces]

`memory` and `space` may also be set at the top level, as defaults for every condition.

Everything is checked before anything is written (an unknown agent, a missing program file or lab, zero
repeats, a window shorter than one budget in seconds, a baseline that names no condition, a lab of another
metric, a sandbox that does not exist here, a lab whose entry point or prompt template is broken: one line
naming the file and the field). A window against a `steps:N` budget cannot be checked in advance. Then `batch:<id>` gets `batch.created` (the question, the
resolved conditions, repeats, criteria) and one `batch.run-added` per run, and each run's `run.created`
names its batch and condition. Runs are created repeat by repeat (every condition's first run, then every
second one...), so a daemon that drives them in that order keeps the conditions abreast.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from statistics import mean, median
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rloopd.errors import LabConfigError
from rloopd.home import Home
from rloopd.log import NewEvent, new_id

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME)
    agent: str
    program: str | None = None
    lab: str | None = None
    budget: str | None = None
    experiments: int | None = Field(default=None, ge=0)
    window: str | None = None
    memory: str | None = None
    space: str | None = None


class Criteria(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str | None = None  # None: the labs' own metric (every condition's lab must report the same)
    baseline: str
    statistic: Literal["median", "mean"] = "median"


class BatchFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1)
    lab: str = "."
    repeats: int = Field(ge=1)
    seed: int = 0
    budget: str | None = None
    experiments: int | None = Field(default=None, ge=0)
    window: str | None = None
    memory: str | None = None
    space: str | None = None
    sandbox: str = "auto"
    criteria: Criteria
    conditions: list[Condition] = Field(min_length=1)


def load_batch(path: Path, home: Home | None = None) -> tuple[BatchFile, list[dict[str, Any]]]:
    """The batch file and its conditions resolved (absolute lab and program paths, budget, experiments,
    window, memory policy, search space) and checked; LabConfigError naming the file and the field. A
    `from:RUN` memory policy is checked against `home` when one is given."""
    from rloopd.agents import check_agent
    from rloopd.inherit import resolve_memory
    from rloopd.lab import load_lab
    from rloopd.runs import check_lab_for, check_space_for, parse_window, with_budget
    from rloopd.sandbox import SandboxError, resolve_kind

    path = Path(path).absolute()
    try:
        spec = BatchFile.model_validate(tomllib.loads(path.read_text()))
    except OSError as e:
        raise LabConfigError(f"{path}: cannot read the batch file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise LabConfigError(f"{path}: cannot read the batch file (not UTF-8: {e})") from None
    except tomllib.TOMLDecodeError as e:
        raise LabConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise LabConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise LabConfigError(f"{path}: {where}: {err['msg']}") from None
    names = [c.name for c in spec.conditions]
    if len(set(names)) != len(names):
        raise LabConfigError(f"{path}: conditions: two conditions share a name ({', '.join(names)})")
    if spec.criteria.baseline not in names:
        raise LabConfigError(f"{path}: criteria.baseline: {spec.criteria.baseline!r} names no condition "
                             f"(conditions: {', '.join(names)})")
    try:
        resolve_kind(spec.sandbox)
    except SandboxError as e:
        raise LabConfigError(f"{path}: sandbox: {str(e).removeprefix('--sandbox ')}") from None
    resolved = []
    first = None  # the condition whose lab gave the metric, when criteria.metric is not named
    for i, c in enumerate(spec.conditions):
        where = f"{path}: conditions.{i}"

        def field(name: str, own: Any, c=c, where=where) -> str:  # the key the value came from
            return f"{where}.{name}" if own is not None else f"{path}: {name}"

        try:
            lab_dir = (path.parent / (c.lab or spec.lab)).resolve()
        except (OSError, ValueError) as e:  # a NUL byte, a link loop
            raise LabConfigError(f"{field('lab', c.lab)}: {c.lab or spec.lab!r} is not a usable path ({e})") from None
        try:
            lab = load_lab(lab_dir)
        except LabConfigError as e:
            raise LabConfigError(f"{field('lab', c.lab)}: {e}") from None
        try:
            check_agent(c.agent)
            check_lab_for(lab, c.agent)
        except LabConfigError as e:
            raise LabConfigError(f"{where}.agent: {str(e).removeprefix('--agent ')}") from None
        space, memory = c.space or spec.space, c.memory or spec.memory
        try:
            lab = lab.with_space(space, "")
            check_space_for(lab, c.agent, "")
        except LabConfigError as e:
            raise LabConfigError(f"{field('space', c.space)}:{e}") from None
        try:
            if home is not None:
                resolve_memory(home, memory, lab, "")
            elif memory is not None:
                from rloopd.memory.rundir import policy_kind

                if policy_kind(memory) not in ("notes", "none", "results-only", "from"):
                    raise LabConfigError(f" {memory!r}: use notes, none, results-only or from:RUN[@STEP]")
        except LabConfigError as e:
            raise LabConfigError(f"{field('memory', c.memory)}:{e}") from None
        budget, window = c.budget or spec.budget, c.window or spec.window
        try:
            if budget is not None:
                lab = with_budget(lab, budget)
        except LabConfigError as e:
            raise LabConfigError(f"{field('budget', c.budget)}: {str(e).removeprefix('--budget ')}") from None
        try:
            seconds = parse_window(window) if window is not None else None
        except LabConfigError as e:
            raise LabConfigError(f"{field('window', c.window)}: {str(e).removeprefix('--window ')}") from None
        # (a window against a steps:N budget cannot be checked here: how long N steps take is not known)
        if seconds is not None and lab.budget_seconds and seconds < lab.budget_seconds:
            raise LabConfigError(f"{field('window', c.window)}: {window} is shorter than one experiment's budget "
                                 f"({lab.budget} s)")
        if spec.criteria.metric is None:  # not named: the first condition's lab's, which the others must share
            spec.criteria.metric = lab.metric.name
            first = i
        if lab.metric.name != spec.criteria.metric:
            said = ("criteria.metric is" if first is None else
                    f"conditions.{first}'s lab reports (set criteria.metric to say which is meant)")
            raise LabConfigError(f"{field('lab', c.lab)}: {lab_dir} reports {lab.metric.name!r}, but "
                                 f"{said} {spec.criteria.metric!r}")
        program = None
        if c.program is not None:
            try:
                program = (path.parent / c.program).resolve()
                found = program.is_file()
            except (OSError, ValueError):  # a NUL byte, a name too long
                found = False
            if not found:
                raise LabConfigError(f"{where}.program: {path.parent / c.program} does not exist")
        resolved.append({"name": c.name, "agent": c.agent, "lab": str(lab_dir),
                         "program": str(program) if program else None, "budget": budget,
                         "experiments": c.experiments if c.experiments is not None else spec.experiments,
                         "window": window, "memory": memory, "space": space})
    return spec, resolved


def create_batch(home: Home, path: Path, request: str | None = None) -> tuple[str, list[str]]:
    """Validate the batch file, then record the batch and create every run; (batch id, run ids in the order
    they should start). A retried request returns what the first one made."""
    from rloopd.inherit import resolve_memory
    from rloopd.lab import load_lab
    from rloopd.runs import create_run

    if request is not None and (prior := home.log.stream_of(request)):
        return prior.removeprefix("batch:"), batch_runs(home, prior.removeprefix("batch:"))
    spec, conditions = load_batch(path, home)
    # A `from:RUN` is resolved once, so every repeat of a condition starts from the same memory even while
    # the source run goes on.
    inherited = {c["name"]: resolve_memory(home, c.get("memory"), load_lab(c["lab"]).with_space(c.get("space")),
                                           f"{path}: {c['name']}.memory") for c in conditions}
    batch = new_id()[:12]
    stream = f"batch:{batch}"
    home.log.append(stream, [NewEvent("batch.created", {
        "question": spec.question, "conditions": conditions, "repeats": spec.repeats,
        "criteria": spec.criteria.model_dump()}, **({"id": request} if request else {}))], expected_n=0)
    made = []
    for r in range(spec.repeats):
        for c in conditions:
            run = create_run(home, Path(c["lab"]), agent=c["agent"], experiments=c["experiments"],
                             budget=c["budget"], seed=spec.seed + r, name=None, sandbox=spec.sandbox,
                             window=c["window"], program=Path(c["program"]) if c["program"] else None,
                             batch=batch, condition=c["name"], memory=c.get("memory"), space=c.get("space"),
                             inherited=inherited[c["name"]])
            home.log.append_one(stream, "batch.run-added", {"run": run, "condition": c["name"]})
            made.append(run)
    return batch, made


def resolve_batch(home: Home, name: str) -> str:
    """A batch id from `ID`, `batch:ID` or a unique prefix of an id; LabConfigError otherwise."""
    name = name.removeprefix("batch:")
    ids = sorted({s.removeprefix("batch:") for s in home.log.streams() if s.startswith("batch:")})
    found = [b for b in ids if b == name] or [b for b in ids if b.startswith(name)]
    if len(found) != 1:
        raise LabConfigError(f"batch {name!r}: " + ("ambiguous" if found else "no such batch in this home"))
    return found[0]


def batch_runs(home: Home, batch: str) -> list[str]:
    return [e.data["run"] for e in home.log.read(f"batch:{batch}", types=["batch.run-added"])]


def batch_info(home: Home, batch: str) -> dict[str, Any]:
    """The batch as recorded, with each condition's progress (a `rloopd batch status` row)."""
    from rloopd.history import run_state

    [created] = list(home.log.read(f"batch:{batch}", types=["batch.created"]))
    rows = {c["name"]: {"condition": c["name"], "agent": c["agent"], "memory": c.get("memory") or "notes",
                        "space": c.get("space"), "runs": 0, "finished": 0, "running": 0,
                        "experiments": 0, "caps": [], "bests": []} for c in created.data["conditions"]}
    direction = "minimize"
    for e in home.log.read(f"batch:{batch}", types=["batch.run-added"]):
        s = run_state(home.log, e.data["run"])
        direction = s.direction
        row = rows[e.data["condition"]]
        row["space"] = row["space"] or (s.created.get("search_space") or {}).get("preset")  # the lab's default
        row["runs"] += 1
        row["finished"] += s.status in ("finished", "stopped", "failed", "archived")
        row["running"] += s.status in ("running", "paused")
        row["experiments"] += s.experiments
        row["caps"].append(s.created.get("experiments"))
        if s.best is not None:
            row["bests"].append(s.best)
    statistic = created.data["criteria"].get("statistic", "median")
    for row in rows.values():
        bests, caps = row.pop("bests"), row.pop("caps")
        row["cap"] = sum(caps) if caps and None not in caps else None  # experiments the runs may make
        row["best"] = (min(bests) if direction == "minimize" else max(bests)) if bests else None
        row[statistic] = (median(bests) if statistic == "median" else mean(bests)) if bests else None
    return {"batch": batch, "question": created.data["question"], "repeats": created.data["repeats"],
            "criteria": created.data["criteria"], "at": created.at, "conditions": list(rows.values())}
