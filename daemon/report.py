"""`rloopd report`: the published figures and statistics of a set of runs, computed from the event log alone.

Reads only events (`history`, the pure `fold`), never a projection, so a report made from an exported or
replayed log is the same report. The definitions are DESIGN section 3's, the ones `rloopd status` folds:

- an experiment is a step >= 1 whose proposal (replica 0) has a finish that is not `interrupted`; a valid
  one finished `ok`; the accepted-change rate is accepted experiments over experiments (in %);
- restarts are sessions opened after one the agent ended itself (`agent-exit`);
- the theoretical maximum is floor(window / budget) for a time budget and a window; None otherwise;
- a run's final best is the best its decisions accepted (`best_after`), step 0 (the baseline) included;
- a fork is reported with its history: its parent's prefix counts, as `rloopd status` counts it.

Runs are grouped by the `condition` on their `run.created` (a batch's), else by what they were made with:
agent, program, memory policy and search space (`setup_of`), named by the agent plus whichever of the other
three differ among those runs ("random · memory none"). Every condition names the four, read from its runs'
`run.created` (so a batch's conditions and hand-picked runs are described alike). The best-so-far curve
at step s is taken over the runs that decided step s (a run that ended is not carried forward). The idea
chart counts, per condition and category, the runs in which an accepted experiment of that category
improved on the best, and the mean improvement (in the metric's better direction, so positive) over those
accepted experiments. Conditions are compared with the baseline condition on the runs' final bests: the
difference of the statistic (median, or mean where the batch's criteria say so), a seeded percentile
bootstrap interval, and a two-sided Mann-Whitney U test (scipy).

Everything is computed and rendered in memory before the output directory is touched, so bad input (an
unknown run or batch, runs whose metric name or direction differ, a run with no finished experiment) writes
nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rloopd.errors import RloopdError, StreamNotFound
from rloopd.history import history, lineage
from rloopd.lab import space_label
from rloopd.log import EventLog
from rloopd.memory.state import fold

FILES = ("curves.png", "runs.png", "ideas.png", "summary.json", "report.html")
BOOTSTRAP = 10_000
UNCATEGORIZED = "uncategorized"
SETUP = ("agent", "program", "memory_policy", "search_space")  # what a condition is made of, in this order
SETUP_WORDS = {"program": "program", "memory_policy": "memory", "search_space": "space"}  # in generated names

Progress = Callable[[str, int, int], None]  # (what, done, total)


class ReportInputError(RloopdError):
    """Runs that cannot make one report: unknown, of different metrics, or without finished experiments."""


@dataclass
class RunRecord:
    run: str
    name: str
    condition: str
    agent: str
    program: str  # `setup_of`'s labels
    memory_policy: str
    search_space: str
    search_space_spec: dict[str, Any]  # as run.created recorded it
    batch: str | None
    metric: str
    direction: str
    budget: str
    window_seconds: float | None
    lineage: list[dict[str, Any]]
    experiments: int
    valid: int
    accepted: int
    accepted_pct: float
    restarts: int
    theoretical_max: int | None
    final_best: float | None
    best_step: int | None
    curve: list[float | None] = field(default_factory=list)  # best so far after each step 0..last decided
    # category -> {"tried": experiments, "improvements": [gain of each accepted experiment, None if unknown]}
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Report:
    summary: dict[str, Any]
    records: list[RunRecord]
    conditions: dict[str, list[RunRecord]]


# --- choosing the runs ----------------------------------------------------------------------------


def resolve_batch(log: EventLog, batch: str) -> str:
    """A batch id from `ID`, `batch:ID` or a unique prefix, as streams and `run.created` name it."""
    name = batch.removeprefix("batch:")
    known = {s.removeprefix("batch:") for s in log.streams() if s.startswith("batch:")}
    known |= {e.data["batch"] for e in log.runs() if e.data.get("batch")}
    found = [b for b in known if b == name] or sorted(b for b in known if b.startswith(name))
    if len(found) != 1:
        raise ReportInputError(f"--batch {batch}: " + (f"ambiguous ({', '.join(found)})" if found
                                                       else "no batch of that id in this home"))
    return found[0]


def batch_created(log: EventLog, batch: str) -> dict[str, Any]:
    """The batch's `batch.created` payload ({} when its stream is missing)."""
    found = next(log.read(f"batch:{batch}", types=["batch.created"]), None)
    return found.data if found is not None else {}


def select(log: EventLog, runs: Sequence[str] = (), batch: str | None = None,
           groups: dict[str, Sequence[str]] | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({condition: [run ids]}, {run id: the argument that named it}) from exactly one of the three forms.

    A batch's runs are those whose `run.created` names it (and, where its stream lists the runs it added,
    listed there); they are grouped by their `condition`, other runs by their agent spec."""
    given = sum(bool(x) for x in (runs, batch, groups))
    if given != 1:
        raise ReportInputError("RUN: name runs, or --batch B" + (" (not both)" if given else ""))
    created = {e.stream: e.data for e in log.runs()}
    named: dict[str, str] = {}

    def resolve(ref: str, where: str) -> str:
        try:
            run = log.resolve(ref)
        except StreamNotFound as e:
            raise ReportInputError(f"{where}: {e}") from None
        if run not in created:
            raise ReportInputError(f"{where}: {run!r} is not a run")
        named.setdefault(run, where)
        return run

    out: dict[str, list[str]] = {}
    if groups:
        for condition, refs in groups.items():
            for ref in refs:
                run = resolve(ref, f"groups[{condition}] {ref!r}")
                if run not in out.setdefault(condition, []):
                    out[condition].append(run)
        return out, named
    if batch:
        b = resolve_batch(log, batch)
        ids = [r for r, d in created.items() if d.get("batch") == b]
        listed = {e.data["run"] for e in log.read(f"batch:{b}", types=["batch.run-added"])}
        if listed:  # a fork copies its parent's run.created, batch included: it is no repeat of the batch
            ids = [r for r in ids if r in listed]
        if not ids:
            raise ReportInputError(f"--batch {batch}: the batch has no runs yet")
        named.update({r: f"--batch {batch}" for r in ids})
    else:
        ids = list(dict.fromkeys(resolve(ref, f"RUN {ref!r}") for ref in runs))
    auto = auto_names({r: setup_of(created[r]) for r in ids if not created[r].get("condition")})
    for run in ids:
        out.setdefault(created[run].get("condition") or auto[run], []).append(run)
    return out, named


def program_label(created: dict[str, Any]) -> str:
    """The program a run follows: the lab's own, or the file a batch condition named (relative to the lab
    where it lies inside it)."""
    path = created.get("program_path")
    if not path:
        return "lab's " + str((created.get("config") or {}).get("program") or "program.md")
    lab = Path(created.get("lab") or "/")
    try:
        return Path(path).relative_to(lab).as_posix()
    except ValueError:
        return Path(path).name


def setup_of(created: dict[str, Any]) -> dict[str, str]:
    """The degrees of freedom a run was made with, as short labels (`SETUP`). A run recorded before memory
    policies and presets existed has memory `notes` and its editable globs as its space."""
    return {"agent": created.get("agent") or "random", "program": program_label(created),
            "memory_policy": created.get("memory_policy") or "notes",
            "search_space": space_label(created.get("search_space"))}


def auto_names(setups: dict[str, dict[str, str]]) -> dict[str, str]:
    """{run: condition name}: the agent, then each other part of the setup that differs among these runs.

    Example: runs of `random` with memory notes and none -> "random · memory notes", "random · memory none"."""
    varying = [k for k in SETUP[1:] if len({s[k] for s in setups.values()}) > 1]
    return {run: " · ".join([s["agent"], *(f"{SETUP_WORDS[k]} {s[k]}" for k in varying)])
            for run, s in setups.items()}


def check_one_metric(log: EventLog, selected: dict[str, list[str]]) -> None:
    """Refuse runs whose metric name or direction differ, naming the first such pair."""
    created = {e.stream: e.data for e in log.runs()}
    first = None
    for condition, ids in selected.items():
        for run in ids:
            d = created[run]
            mine = (d.get("metric") or "val_bpb", d.get("direction") or "minimize", run, d.get("name", run),
                    condition)  # the defaults are run.created's own, for runs recorded before the fields
            if first is None:
                first = mine
            elif mine[:2] != first[:2]:
                raise ReportInputError(f"cannot compare {_who(first)} with {_who(mine)}: one report compares one "
                                       "metric in one direction")


def _who(x: tuple[str, str, str, str, str]) -> str:
    metric, direction, run, name, condition = x
    return f"{metric} ({direction}) of run {run} ({'' if name == run else name + ', '}condition {condition})"


# --- one run --------------------------------------------------------------------------------------


def collect_run(log: EventLog, run: str, condition: str) -> RunRecord:
    """A run's figures from its history (a fork's parent prefix first)."""
    events = history(log, run)
    created = next(e.data for e in events if e.stream == run and e.type == "run.created")
    state = fold(events)
    sign = 1.0 if state.direction == "minimize" else -1.0
    started: dict[int, str | None] = {}  # step -> category of its proposal
    categories: dict[str, dict[str, Any]] = {}
    decided: dict[int, float | None] = {}  # step -> best after its decision
    best = None
    for e in events:
        d = e.data
        if e.type == "experiment.started" and d.get("replica", 0) == 0:
            started[d["step"]] = d.get("category")
        elif e.type == "experiment.finished" and counted(d):
            cat = categories.setdefault(started.get(d["step"]) or UNCATEGORIZED, {"tried": 0, "improvements": []})
            cat["tried"] += 1
        elif e.type == "experiment.decided":
            if d["accepted"]:
                if d["step"] >= 1:
                    before, after = d.get("best_before"), d.get("best_after")
                    gain = None if before is None or after is None else sign * (before - after)
                    cat = categories.setdefault(started.get(d["step"]) or UNCATEGORIZED,
                                                {"tried": 0, "improvements": []})
                    cat["improvements"].append(gain)
                best = d.get("best_after")
            decided[d["step"]] = best
    curve: list[float | None] = []
    for step in range(max(decided, default=-1) + 1):
        curve.append(decided.get(step, curve[-1] if curve else None))
    budget = created.get("budget") or ""
    window = created.get("window_seconds")
    seconds = None if not budget or budget.startswith("steps:") else float(budget)
    setup = setup_of(created)
    return RunRecord(
        run=run, name=created.get("name", run), condition=condition, agent=setup["agent"],
        program=setup["program"], memory_policy=setup["memory_policy"], search_space=setup["search_space"],
        search_space_spec=created.get("search_space") or {}, batch=created.get("batch"), metric=state.metric,
        direction=state.direction, budget=budget,
        window_seconds=window, lineage=named_lineage(log, run), experiments=state.experiments, valid=state.valid,
        accepted=state.accepted, accepted_pct=100.0 * state.accepted / state.experiments if state.experiments else 0.0,
        restarts=state.restarts, theoretical_max=math.floor(window / seconds) if window and seconds else None,
        final_best=state.best, best_step=state.best_step, curve=curve, categories=categories)


def named_lineage(log: EventLog, run: str) -> list[dict[str, Any]]:
    """`history.lineage` with each ancestor's name: [{run, name, step, n}] from the root."""
    out = []
    for x in lineage(log, run):
        first = next(log.read(x["run"], until_n=0), None)
        out.append({**x, "name": first.data.get("name") if first is not None else None})
    return out


def counted(finished: dict[str, Any]) -> bool:
    """Whether an `experiment.finished` payload is an experiment (DESIGN section 3)."""
    return finished["step"] >= 1 and finished.get("replica", 0) == 0 and finished["status"] != "interrupted"


# --- statistics -----------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    """A JSON-safe float (numpy scalars become floats; NaN and inf become None)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def spread(values: Sequence[float]) -> dict[str, Any]:
    """median, quartiles (linear interpolation, numpy's default) and IQR of `values`; None without any."""
    import numpy as np

    if not values:
        return {"median": None, "q1": None, "q3": None, "iqr": None, "values": []}
    q1, med, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": _num(med), "q1": _num(q1), "q3": _num(q3), "iqr": _num(q3 - q1), "values": list(values)}


def compare(x: Sequence[float], y: Sequence[float], statistic: str = "median", seed: int = 0,
            resamples: int = BOOTSTRAP, level: float = 0.95) -> dict[str, Any]:
    """stat(x) - stat(y), its percentile-bootstrap interval (seeded: the same input gives the same interval)
    and the two-sided Mann-Whitney U test of x against y."""
    import numpy as np
    from scipy.stats import mannwhitneyu

    if not x or not y:
        return {"difference": None, "ci": [None, None], "u": None, "p_value": None}
    stat = np.median if statistic == "median" else np.mean
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    bx = stat(rng.choice(xs, size=(resamples, len(xs)), replace=True), axis=1)
    by = stat(rng.choice(ys, size=(resamples, len(ys)), replace=True), axis=1)
    lo, hi = np.percentile(bx - by, [50 * (1 - level), 100 - 50 * (1 - level)])
    test = mannwhitneyu(xs, ys, alternative="two-sided")
    return {"difference": _num(stat(xs) - stat(ys)), "ci": [_num(lo), _num(hi)],
            "u": _num(test.statistic), "p_value": _num(test.pvalue)}


def curve_bands(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Per step: the median and quartiles of best-so-far over the runs that decided that step."""
    import numpy as np

    out = []
    for step in range(max((len(r.curve) for r in records), default=0)):
        vals = [r.curve[step] for r in records if step < len(r.curve) and r.curve[step] is not None]
        if vals:
            q1, med, q3 = np.percentile(np.asarray(vals, dtype=float), [25, 50, 75])
            out.append({"step": step, "median": _num(med), "q1": _num(q1), "q3": _num(q3), "runs": len(vals)})
    return out


def best_record(records: Sequence[RunRecord]) -> RunRecord | None:
    """The run with the best final best in the metric's direction (the first of equals)."""
    scored = [r for r in records if r.final_best is not None]
    if not scored:
        return None
    sign = 1.0 if scored[0].direction == "minimize" else -1.0
    return min(scored, key=lambda r: sign * r.final_best)


def idea_shares(records: Sequence[RunRecord]) -> dict[str, dict[str, Any]]:
    """category -> runs that tried it, runs it improved in, their share of all runs, mean improvement."""
    cats = sorted({c for r in records for c in r.categories})
    out = {}
    for c in cats:
        tried = sum(1 for r in records if r.categories.get(c, {}).get("tried"))
        improved = sum(1 for r in records if r.categories.get(c, {}).get("improvements"))
        gains = [g for r in records for g in r.categories.get(c, {}).get("improvements", []) if g is not None]
        out[c] = {"tried_runs": tried, "improved_runs": improved,
                  "share": improved / len(records) if records else 0.0,
                  "mean_improvement": _num(sum(gains) / len(gains)) if gains else None,
                  "accepted": sum(len(r.categories.get(c, {}).get("improvements", [])) for r in records)}
    return out


def shared(values: Sequence[str]) -> str:
    """One label for a condition: its runs' common value, else their distinct values joined by " | "."""
    return " | ".join(dict.fromkeys(values))


def condition_summary(records: Sequence[RunRecord]) -> dict[str, Any]:
    best = best_record(records)
    final = spread([r.final_best for r in records if r.final_best is not None])
    maxima = {r.theoretical_max for r in records}
    return {
        **{key: shared([getattr(r, key) for r in records]) for key in SETUP},
        "runs": [r.run for r in records],
        "median_final_best": final["median"], "q1": final["q1"], "q3": final["q3"], "iqr": final["iqr"],
        "final_best": final["values"],
        "best_run": None if best is None else {"run": best.run, "name": best.name, "value": best.final_best,
                                              "step": best.best_step},
        "accepted_pct": spread([r.accepted_pct for r in records]),
        "restarts": spread([r.restarts for r in records]),
        "valid_experiments": spread([r.valid for r in records]),
        "experiments": spread([r.experiments for r in records]),
        # one number where every run of the condition has the same one; None where undefined or mixed
        "theoretical_max": maxima.pop() if len(maxima) == 1 else None,
        "ideas": idea_shares(records),
        "curve": curve_bands(records),
    }


# --- the report -----------------------------------------------------------------------------------


def build_report(log: EventLog, *, runs: Sequence[str] = (), batch: str | None = None,
                 groups: dict[str, Sequence[str]] | None = None, question: str | None = None,
                 baseline: str | None = None, statistic: str | None = None, seed: int = 0,
                 on_progress: Progress | None = None) -> Report:
    """Every number of the report, checked. `groups` ({condition: [runs]}) sets the conditions by hand;
    for a batch, its `batch.created` supplies the question, the baseline and the statistic unless given."""
    selected, named = select(log, runs, batch, groups)
    info: dict[str, Any] = {}
    if batch:
        batch = resolve_batch(log, batch)
        info = batch_created(log, batch)
    criteria = info.get("criteria") or {}
    question = question if question is not None else info.get("question", "")
    statistic = statistic or criteria.get("statistic") or "median"
    if statistic not in ("median", "mean"):
        raise ReportInputError(f"statistic {statistic!r}: use median or mean")
    check_one_metric(log, selected)
    total = sum(len(v) for v in selected.values())
    records, conditions, skipped = [], {}, []
    for condition, ids in selected.items():
        for run in ids:
            if on_progress:
                on_progress(f"reading {run}", len(records) + len(skipped), total)
            r = collect_run(log, run, condition)
            if r.experiments == 0:
                if batch:  # a batch still under way: its runs without an experiment yet wait
                    skipped.append({"run": run, "name": r.name, "condition": condition,
                                    "reason": "no finished experiment yet"})
                    continue
                raise ReportInputError(f"{named[run]}: run {run} ({r.name}) has no finished experiments "
                                       "(a step >= 1 that was not interrupted)")
            records.append(r)
            conditions.setdefault(condition, []).append(r)
    if not records:
        raise ReportInputError(f"--batch {batch}: none of its runs has a finished experiment yet")
    baseline = pick_baseline(conditions, baseline if baseline is not None else criteria.get("baseline"),
                             explicit=baseline is not None)
    if baseline is not None:
        conditions = {baseline: conditions[baseline], **{k: v for k, v in conditions.items() if k != baseline}}
    summary = {
        "question": question or "", "metric": records[0].metric, "direction": records[0].direction,
        "batch": batch, "baseline": baseline, "statistic": statistic,
        "log_seq": log.last_seq(),  # the report reads the log up to here
        "conditions": {c: condition_summary(rs) for c, rs in conditions.items()},
        "comparisons": [],
        "bootstrap": {"resamples": BOOTSTRAP, "confidence": 0.95, "seed": seed},
        "runs": [run_row(r) for r in records],
        "skipped": skipped,
    }
    if baseline is not None:
        base = [r.final_best for r in conditions[baseline] if r.final_best is not None]
        for c, rs in conditions.items():
            if c != baseline:
                mine = [r.final_best for r in rs if r.final_best is not None]
                summary["comparisons"].append({"condition": c, "baseline": baseline, "statistic": statistic,
                                               **compare(mine, base, statistic, seed)})
    return Report(summary=summary, records=records, conditions=conditions)


def pick_baseline(conditions: dict[str, list[RunRecord]], wanted: str | None, explicit: bool) -> str | None:
    """The condition the others are compared with: the one asked for (a batch's criteria name one: None when
    none of its runs can be reported yet), else `random` if there is one, else the first; None with a
    single condition."""
    if wanted is not None:
        if wanted in conditions:
            return wanted
        if explicit:
            raise ReportInputError(f"--baseline {wanted}: no such condition here ({', '.join(conditions)})")
        return None
    if len(conditions) < 2:
        return None
    return "random" if "random" in conditions else next(iter(conditions))


def run_row(r: RunRecord) -> dict[str, Any]:
    row = asdict(r)
    row.pop("curve"), row.pop("categories")
    return row


def write_report(log: EventLog, out_dir: Path, *, on_progress: Progress | None = None, **kw: Any) -> dict[str, Any]:
    """Build the report (see `build_report` for the arguments), render it, then write `FILES` into
    `out_dir`; the summary as written. Nothing is written when an argument is bad."""
    from rloopd import report_render as render

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportInputError(f"-o {out_dir}: exists and is not a directory")
    report = build_report(log, on_progress=on_progress, **kw)
    steps = [("curves.png", render.curves_png), ("runs.png", render.runs_png), ("ideas.png", render.ideas_png)]
    images: dict[str, bytes] = {}
    for i, (name, draw) in enumerate(steps):
        if on_progress:
            on_progress(f"drawing {name}", i, len(steps) + 1)
        images[name] = draw(report)
    if on_progress:
        on_progress("writing report.html", len(steps), len(steps) + 1)
    page = render.html_page(report, images)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportInputError(f"-o {out_dir}: cannot create it ({e.strerror})") from None
    for name, data in images.items():
        (out_dir / name).write_bytes(data)
    (out_dir / "summary.json").write_text(json.dumps(report.summary, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return report.summary
