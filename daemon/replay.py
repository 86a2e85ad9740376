"""Replay a run: rebuild every projection from its log and compare with the live ones; verify the rest.

It reads the run's history (its parent's prefix included) in one read transaction and one pass: audit
checks each event of every stream it touches (hash chain, canonical text, payload, blobs) and hands over
those a projection folds. Then it checks every commit the events name and the frozen manifest recorded at
creation, rebuilds the run state, the experiments table and the run directory's memory into a scratch
location, and compares them with the live projections. It never reads fold snapshots (they are a cache of
what it rebuilds), never calls an agent and never trains.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rloopd.audit import audit
from rloopd.errors import RloopdError
from rloopd.history import ranges
from rloopd.home import Home
from rloopd.log import Event, as_read
from rloopd.memory import experiments as ex
from rloopd.memory.folded import LAST
from rloopd.memory.folded import TYPES as FOLDED
from rloopd.memory.rundir import MemoryFiles, project_memory
from rloopd.memory.state import fold

COMPARED_FILES = ("program.md", "memory/results.tsv", "memory/notes.md", "memory/checkpoint.pt")


@dataclass
class ReplayReport:
    run: str
    events: int = 0
    position: int = -1
    divergences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.divergences

    def add(self, kind: str, what: str, **where: Any) -> None:
        self.divergences.append({"kind": kind, "what": what, **where})

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "ok": self.ok, "events": self.events, "position": self.position,
                "divergences": self.divergences}


def replay(home: Home, run: str, tries: int = 5) -> ReplayReport:
    """Replay `run`. A live run's projections may move while they are compared: when the run directory's
    position changed meanwhile, the comparison is made again (up to `tries` times)."""
    table = ex.ExperimentsTable(home.log)
    for _ in range(tries):
        before = (table.position_of(f"rundir:{run}"), table.position())
        report = _replay_once(home, run)
        if report.ok or (table.position_of(f"rundir:{run}"), table.position()) == before:
            return report
    return report


def _replay_once(home: Home, run: str) -> ReplayReport:
    report = ReplayReport(run)
    conn = home.log.conn
    conn.execute("BEGIN")  # one read transaction: a consistent snapshot of the log
    try:
        history = ranges(home.log, run)
        until = {s: LAST if n is None else n for s, n in history}
        events: list[Event] = []  # the history's events that a projection folds (the others only count)

        def keep(stream: str, row: tuple, data: Any) -> None:  # one pass: each event verified, then kept
            if isinstance(data, dict) and row[1] <= until[stream]:  # not past a fork position
                seq, n, type_, v, at, _text, prev, hash_, id_ = row
                try:
                    data = as_read(type_, v, data)  # as the live projections read it
                except RloopdError:
                    pass  # audit names it
                events.append(Event(seq, id_, stream, n, type_, v, at, data, prev, hash_))

        chain = audit(home.log, home.blobs, [s for s, _ in history], visit=dict.fromkeys(FOLDED, keep))
        for stream, last in until.items():
            count, position = conn.execute("SELECT COUNT(*), MAX(n) FROM events WHERE stream = ? AND n <= ?",
                                           (stream, last)).fetchone()
            report.events += count
            report.position = -1 if position is None else position
        table = ex.ExperimentsTable(home.log)
        live_rows = {(r["run"], r["step"], r["replica"]): r for r in table.rows(run)}
        table_seq = table.position()  # each live projection is compared as of its own position
        rundir_n = table.position_of(f"rundir:{run}")
    finally:
        conn.execute("COMMIT")
    for p in chain.problems:
        report.add("event", p.what, stream=p.stream, n=p.n, seq=p.seq)
    state = fold(events)
    check_commits(home, events, report)
    check_manifest(home, state.created, report)
    rebuilt = ex.rebuild([e for e in events if e.seq <= table_seq])
    for key, row in sorted(rebuilt.items()):
        if key[0] != run:
            continue  # a fork's prefix rows live under the parent's stream
        live = live_rows.get(key)
        if live is None:
            report.add("projection", "experiments table: row missing", step=key[1], replica=key[2])
            continue
        for col, value in row.items():
            if live.get(col) != value:
                report.add("projection", f"experiments table: {col} is {live.get(col)!r}, the log says {value!r}",
                           step=key[1], replica=key[2], field=col)
    if rundir_n is None:
        report.add("projection", "the run directory was never projected")
    else:
        upto = [e for e in events if e.stream != run or e.n <= rundir_n]
        compare_run_dir(home, run, upto, state.created.get("metric", "val_bpb"), report)
    return report


def check_commits(home: Home, events: list, report: ReplayReport) -> None:
    commits = {e.data["commit"]: e for e in events if e.type == "experiment.started"}
    commits.update({e.data["base_commit"]: e for e in events if e.type == "run.created" and e.data.get("base_commit")})
    for commit in home.snapshots.missing(list(commits)):  # one git process for all of them
        e = commits[commit]
        report.add("commit", f"commit {commit} is missing from the snapshot repository", stream=e.stream, n=e.n)


def check_manifest(home: Home, created: dict[str, Any], report: ReplayReport) -> None:
    for entry in created.get("manifest", []):
        if not entry.get("blob"):
            continue
        why = home.blobs.verify(entry["blob"])
        if why:
            report.add("manifest", f"{entry['path']}: {why}")
        elif hashlib.sha256(home.blobs.get(entry["blob"])).hexdigest() != entry["sha256"]:
            report.add("manifest", f"{entry['path']}: its blob does not match the recorded sha256")


def compare_run_dir(home: Home, run: str, events: list, metric: str, report: ReplayReport) -> None:
    """Project memory into a scratch directory and compare with the live run directory, file by file."""
    mem = MemoryFiles()
    for e in events:
        mem.apply(e)
    rows = [r for _, r in sorted(ex.rebuild(events).items(), key=lambda kv: (kv[0][1], kv[0][2]))]
    live_dir = home.run_dir(run)
    with tempfile.TemporaryDirectory(prefix="rloopd-replay-") as tmp:
        scratch = Path(tmp)
        try:
            project_memory(scratch, mem, home.blobs, ex.results_tsv(rows, metric))
        except Exception as e:  # a blob the projection needs is missing or corrupt
            report.add("blob", f"cannot rebuild the run directory: {e}")
            return
        expected = {p.relative_to(scratch).as_posix() for p in scratch.rglob("*") if p.is_file()}
        for rel in sorted(expected | {f for f in COMPARED_FILES if (live_dir / f).exists()}):
            ours, theirs = scratch / rel, live_dir / rel
            if not theirs.exists():
                report.add("projection", f"{rel}: missing from the run directory", file=rel)
            elif not ours.exists():
                report.add("projection", f"{rel}: in the run directory but not in the log", file=rel)
            elif ours.read_bytes() != theirs.read_bytes():
                report.add("projection", f"{rel}: differs from a rebuild from the log", file=rel)
