"""`rloopd export-mlflow`: runs written into an MLflow tracking store from the event log alone, idempotently.

A run's export is a pure read of its history (a fork's parent prefix first, as `rloopd report` reads it),
so the same log always gives the same MLflow run, whichever machine exports it:

- params (fixed once the run exists, as MLflow wants them): what `run.created` recorded, i.e. agent,
  program, lab and manifest digest, memory policy, search space, seed, budget, metric and direction,
  and a fork's lineage;
- metrics per step (`step` = the experiment's step, timestamp = its event's time): the lab's metric under
  its own name for each proposal (replica 0) that finished `ok`, `best_<metric>` and `accepted` (0/1) at
  each decision, and `wall_seconds` of each finished proposal. Nothing else a lab reports is exported: its hidden test
  value in particular stays in the log;
- tags (which change as the run moves on): `rloopd.run_id` (how a later export finds the run again),
  `rloopd.home`, `rloopd.status`, the counts of `rloopd status`, the program in force, and
  `rloopd.exported_head`, the run's own head event when it was last exported;
- artifacts: notes.md (when the agent wrote one), results.tsv (as the run directory shows it), program.md
  in force, and `rloopd report`'s curves.png and ideas.png for this run alone.

Exporting again adds only the (metric, step) pairs MLflow does not hold yet, sets the tags, and rewrites
the artifacts under the same names only when the run's head moved; params already there are left alone.
Every run is resolved and read before the tracking store is touched, so an unknown run writes nothing.
A store that fails mid-export (a server's error, a locked database) is one line naming the run it was
writing (TrackerError); what was written stays, and exporting again adds the rest.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from rloopd.errors import RloopdError, StreamNotFound
from rloopd.history import lineage, ranges
from rloopd.home import Home
from rloopd.lab import space_label
from rloopd.log import Event, EventLog
from rloopd.memory.folded import fold_history
from rloopd.memory.state import parse_at

TYPES = ("experiment.finished", "experiment.decided", "program.changed", "run.created")
MLFLOW_STATUS = {"running": "RUNNING", "paused": "RUNNING", "finished": "FINISHED", "archived": "FINISHED",
                 "stopped": "KILLED", "failed": "FAILED"}
TERMINAL_EVENTS = ("run.finished", "run.stopped", "run.archived")
BATCH = 1000  # MLflow's limit on the entries of one log_batch call (params: 100)
PARAM_BATCH = 100
RUN_ID_TAG = "rloopd.run_id"
HEAD_TAG = "rloopd.exported_head"


class TrackerError(RloopdError):
    """An export that cannot be made: mlflow missing, a tracking store that does not open, an experiment
    that was deleted there."""


@dataclass(frozen=True)
class Point:
    """One metric value at one step, as MLflow stores it (timestamp in ms since the epoch)."""

    key: str
    value: float
    step: int
    timestamp: int


@dataclass
class TrackedRun:
    """What an experiment tracker gets of one rloopd run; built by `collect` from the log alone."""

    run: str
    name: str
    status: str  # the fold's: running, paused, stopped, finished, failed, archived
    metric: str
    head: str  # "n:hash" of the run's own last event: whether anything happened since the last export
    start_ms: int
    end_ms: int | None  # when a terminal event ended it
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)


def _ms(at: str) -> int:
    return int(parse_at(at).timestamp() * 1000)


def resolve_runs(home: Home, refs: list[str]) -> list[str]:
    """Run ids for `refs` (ids, prefixes, names), duplicates dropped; the first unknown one is an error."""
    known = {e.stream for e in home.log.runs()}
    out: list[str] = []
    for ref in refs:
        run = home.log.resolve(ref)
        if run not in known:
            raise StreamNotFound(f"RUN {ref!r}: {run!r} is not a run")
        if run not in out:
            out.append(run)
    return out


def collect(home: Home, run: str) -> TrackedRun:
    """The run as a tracker sees it (see the module docstring), read from its history."""
    log = home.log
    state = fold_history(log, run).state
    events = [e for stream, last in ranges(log, run) for e in log.read(stream, until_n=last, types=TYPES)]
    programs = list(dict.fromkeys(e.data["program_blob"] for e in events
                                  if e.type in ("run.created", "program.changed") and e.data.get("program_blob")))
    head = log.head(run)
    ended = None
    if state.status in ("finished", "stopped", "failed", "archived"):
        last = next(iter(reversed(list(log.read(run, types=TERMINAL_EVENTS)))), None)
        ended = _ms(last.at) if last is not None else None
    tags = {
        RUN_ID_TAG: run, "rloopd.name": state.name, "rloopd.home": str(home.path), "rloopd.status": state.status,
        "rloopd.lab_path": str(state.created.get("lab") or ""), "rloopd.step": str(state.step),
        "rloopd.experiments": str(state.experiments), "rloopd.valid": str(state.valid),
        "rloopd.accepted": str(state.accepted), "rloopd.best": "" if state.best is None else repr(state.best),
        "rloopd.best_step": "" if state.best_step is None else str(state.best_step),
        "rloopd.program_blob": state.program_blob or "", "rloopd.program_versions": str(len(programs)),
    }
    return TrackedRun(run=run, name=state.name, status=state.status, metric=state.metric,
                      head=f"{head[0]}:{head[1]}" if head else "", start_ms=_ms(next(log.read(run, until_n=0)).at),
                      end_ms=ended, params=params_of(log, run, state.created), tags=tags,
                      points=points_of(events, state.metric))


def points_of(events: list[Event], metric: str) -> list[Point]:
    """The metric history: per step, the proposal's value (a valid experiment's), then its decision's."""
    points: dict[tuple[str, int], Point] = {}

    def add(key: str, value: Any, step: int, at: str) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            points.setdefault((key, step), Point(key, float(value), step, _ms(at)))

    for e in events:
        d = e.data
        if e.type == "experiment.finished" and d.get("replica", 0) == 0 and d["status"] != "interrupted":
            if d["status"] == "ok":
                add(metric, (d.get("metrics") or {}).get(metric), d["step"], e.at)
            add("wall_seconds", d.get("wall_seconds"), d["step"], e.at)
        elif e.type == "experiment.decided":
            add(f"best_{metric}", d.get("best_after"), d["step"], e.at)
            add("accepted", 1.0 if d["accepted"] else 0.0, d["step"], e.at)
    return sorted(points.values(), key=lambda p: (p.step, p.key))


def params_of(log: EventLog, run: str, created: dict[str, Any]) -> dict[str, str]:
    """What `run.created` fixed, as MLflow params (strings; none of them ever changes for a run)."""
    from rloopd.report import program_label
    from rloopd.runs import manifest_digest

    parent = created.get("parent")
    params = {
        "agent": created.get("agent") or "random", "program": program_label(created),
        "program_blob": created.get("program_blob") or "",
        "lab": (created.get("config") or {}).get("name") or Path(created.get("lab") or "lab").name,
        "lab_manifest": manifest_digest(created), "memory_policy": created.get("memory_policy") or "notes",
        "search_space": space_label(created.get("search_space")), "seed": str(created.get("seed", 0)),
        "budget": str(created.get("budget") or ""),
        "experiments": "none" if created.get("experiments") is None else str(created["experiments"]),
        "metric": created.get("metric") or "val_bpb", "direction": created.get("direction") or "minimize",
        "sandbox": str(created.get("sandbox") or ""),
    }
    if created.get("window_seconds"):
        params["window_seconds"] = str(created["window_seconds"])
    if created.get("batch"):
        params |= {"batch": created["batch"], "condition": str(created.get("condition"))}
    if parent:
        chain = " -> ".join(f"{x['run']}@{x['step']}" for x in lineage(log, run))
        params |= {"parent_run": parent["run"], "parent_step": str(parent["step"]), "lineage": f"{chain} -> {run}"}
    return params


def artifacts(home: Home, run: str) -> dict[str, bytes]:
    """{file name: bytes} to attach: notes.md (if any), results.tsv, program.md and the report's figures."""
    from rloopd import report_render as render
    from rloopd.report import ReportInputError, build_report

    folded = fold_history(home.log, run)
    files: dict[str, bytes] = {"results.tsv": folded.results_tsv(folded.state.metric).encode()}
    notes = folded.mem.files.get("notes.md")
    if notes:
        files["notes.md"] = home.blobs.get(notes)
    if folded.mem.program_blob:
        files["program.md"] = home.blobs.get(folded.mem.program_blob)
    try:
        report = build_report(home.log, runs=[run])
    except ReportInputError:  # no finished experiment yet: nothing to draw
        return files
    files["curves.png"] = render.curves_png(report)
    files["ideas.png"] = render.ideas_png(report)
    return files


# --- MLflow ---------------------------------------------------------------------------------------


def open_mlflow(tracking_uri: str) -> Any:
    """An `mlflow.MlflowClient` on `tracking_uri`, checked by one request, so that a bad URI is one error
    naming it before anything is written. mlflow is imported here only: it is an optional extra."""
    check_sqlite(tracking_uri)
    try:
        import mlflow
    except ImportError:
        raise TrackerError("mlflow is not installed: pip install 'rloopd[mlflow]'") from None
    for name in ("mlflow", "alembic"):  # their schema-migration chatter is not ours to print
        logging.getLogger(name).setLevel(logging.WARNING)
    # a tracking server that does not answer fails in seconds, not after MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - MLflow, SQLAlchemy and requests each raise their own
        raise TrackerError(f"--tracking-uri {tracking_uri}: cannot open it ({_reason(e)})") from None
    return client


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _failure(e: Exception) -> str:
    """`_reason`, named by the error's type unless it is MLflow's own (whose messages read as sentences)."""
    return _reason(e) if type(e).__name__ == "MlflowException" else f"{type(e).__name__}: {_reason(e)}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` store, as MLflow reads the URI (`sqlite:///rel.db` is relative to
    the working directory, `sqlite:////abs.db` absolute); None for any other store or an in-memory one."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = unquote(tracking_uri.removeprefix("sqlite:///").split("?", 1)[0])
    return Path(path).expanduser().absolute() if path and path != ":memory:" else None


def check_sqlite(tracking_uri: str) -> None:
    """Refuse a sqlite store MLflow would mishandle: it makes any missing parent directories (a typo makes
    a tree), and it retries a file it cannot open for over a minute before it gives up."""
    where = f"--tracking-uri {tracking_uri}"
    if tracking_uri.split("?", 1)[0] in ("sqlite://", "sqlite:///:memory:"):
        raise TrackerError(f"{where}: an in-memory store is gone when the command ends; name a file")
    path = sqlite_path(tracking_uri)
    if path is None:
        return
    if not path.parent.is_dir():
        raise TrackerError(f"{where}: directory {path.parent} does not exist (create it first)")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise TrackerError(f"{where}: directory {path.parent} is not writable")
    if path.exists():
        if not path.is_file():
            raise TrackerError(f"{where}: {path} is not a file")
        try:
            with path.open("rb") as f:
                header = f.read(16)
        except OSError as e:
            raise TrackerError(f"{where}: cannot read {path} ({e.strerror})") from None
        if header and header != b"SQLite format 3\x00":
            raise TrackerError(f"{where}: {path} is not an SQLite database")
        if not os.access(path, os.W_OK):
            raise TrackerError(f"{where}: {path} is not writable")


def experiment_id(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, made if missing. Artifacts of a sqlite store go beside its database
    (`mlartifacts/`), not into `./mlruns` of whatever directory the export ran in."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise TrackerError(f"--experiment {name}: deleted in this tracking store; restore it "
                               "(mlflow experiments restore) or name another")
        return found.experiment_id
    path = sqlite_path(tracking_uri)
    return client.create_experiment(name, artifact_location=str(path.parent / "mlartifacts") if path else None)


def find_run(client: Any, exp: str, run: str) -> Any | None:
    """The MLflow run that holds rloopd run `run` in experiment `exp` (the oldest, should two exist)."""
    found = client.search_runs([exp], filter_string=f"tags.`{RUN_ID_TAG}` = '{run}'",
                               order_by=["attributes.start_time ASC"], max_results=10)
    return found[0] if found else None


def export_mlflow(home: Home, refs: list[str], tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    """Export runs `refs` into experiment `experiment` of `tracking_uri`; one summary per run.

    Example: export_mlflow(h, ["lr-sweep"], "sqlite:///mlflow.db", "rloopd")
    -> [{"run": "3f0c9a1e2b7d", "mlflow_run_id": "...", "created": True, "metrics_added": 27, ...}]
    """
    tracked = [collect(home, run) for run in resolve_runs(home, refs)]
    client = open_mlflow(tracking_uri)
    try:
        exp = experiment_id(client, experiment, tracking_uri)
    except RloopdError:
        raise
    except Exception as e:  # noqa: BLE001 - MLflow, SQLAlchemy and requests each raise their own
        raise TrackerError(f"--experiment {experiment}: {_failure(e)}") from e
    done = []
    for t in tracked:
        try:
            done.append(write_mlflow(client, exp, home, t) | {"experiment": experiment, "experiment_id": exp})
        except RloopdError:
            raise
        except Exception as e:  # noqa: BLE001 - the store failed mid-export (a server's 5xx, a locked database)
            before = f" ({', '.join(d['run'] for d in done)} exported)" if done else ""
            raise TrackerError(f"run {t.run}: {_failure(e)}; exporting again resumes{before}") from e
    return done


def write_mlflow(client: Any, exp: str, home: Home, t: TrackedRun) -> dict[str, Any]:
    """Bring one MLflow run up to `t`: create it, or add what it lacks (see the module docstring)."""
    from mlflow.entities import Metric, Param, RunTag

    existing = find_run(client, exp, t.run)
    created = existing is None
    if created:
        existing = client.create_run(exp, start_time=t.start_ms, tags={RUN_ID_TAG: t.run}, run_name=t.name)
    rid = existing.info.run_id
    params = [Param(k, v) for k, v in t.params.items() if k not in existing.data.params]
    for i in range(0, len(params), PARAM_BATCH):
        client.log_batch(rid, params=params[i:i + PARAM_BATCH])
    have = {key: {m.step for m in client.get_metric_history(rid, key)} for key in {p.key for p in t.points}}
    new = [Metric(p.key, p.value, p.timestamp, p.step) for p in t.points if p.step not in have[p.key]]
    for i in range(0, len(new), BATCH):
        client.log_batch(rid, metrics=new[i:i + BATCH])
    attached: list[str] = []
    if created or existing.data.tags.get(HEAD_TAG) != t.head:
        files = artifacts(home, t.run)
        with tempfile.TemporaryDirectory(prefix="rloopd-export-") as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            client.log_artifacts(rid, tmp)  # the same names each time: a file is replaced, never doubled
        attached = sorted(files)
    client.log_batch(rid, tags=[RunTag(k, v) for k, v in t.tags.items()])
    status = MLFLOW_STATUS.get(t.status, "RUNNING")
    if status == "RUNNING":
        if existing.info.status != "RUNNING":  # resumed since the last export
            client.update_run(rid, status="RUNNING")
    elif existing.info.status != status or existing.info.end_time != t.end_ms:
        client.set_terminated(rid, status=status, end_time=t.end_ms)
    client.set_tag(rid, HEAD_TAG, t.head)  # last: an export cut short is redone whole next time
    return {"run": t.run, "name": t.name, "status": t.status, "mlflow_run_id": rid, "created": created,
            "params_added": len(params), "metrics_added": len(new), "metric_points": len(t.points),
            "artifacts": attached}
