"""Fold snapshots are a cache: a fold started from one equals the fold of the whole history, at every
position, across fork boundaries, and whatever happened to the snapshots (damaged, missing, made by other
code, for another log)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rloopd import runs
from rloopd.fork import fork_point, fork_run
from rloopd.history import history
from rloopd.log import EventLog, NewEvent
from rloopd.loop import Loop
from rloopd.memory import experiments as ex
from rloopd.memory import folded
from rloopd.memory.folded import Folded, FoldSnapshots, fold_history
from rloopd.memory.rundir import MemoryFiles
from rloopd.memory.state import RunState, apply
from rloopd.replay import replay

from .conftest import SHA, sample_payloads
from .daemon_helpers import make_lab

BLOBS = [c * 64 for c in "abcdef"]


def truth(log: EventLog, run: str, n: int | None = None) -> tuple:
    """What the definitions say, from every event of the history: no snapshot, no skipped type."""
    events = history(log, run, until_n=n)
    mem = MemoryFiles()
    for e in events:
        mem.apply(e)
    rows = ex.rebuild(events)
    metric_of = {e.stream: e.data.get("metric", "val_bpb") for e in events if e.type == "run.created"}
    tsv = ex.results_tsv([r for _, r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2]))], "val_bpb")
    return functools.reduce(apply, events, RunState()), mem, metric_of, rows, tsv


def view(f: Folded) -> tuple:
    return f.state, f.mem, f.metric_of, f.rows, f.results_tsv("val_bpb")


class Writer:
    """Appends a plausible run's events, folding them as the loop does, and saves a snapshot when told."""

    def __init__(self, log: EventLog, run: str):
        self.log, self.run = log, run
        self.f = fold_history(log, run)
        self.store = FoldSnapshots(log)
        self.retry: tuple[int, int] | None = None

    def add(self, type_: str, data: dict) -> None:
        self.f.add(self.log.append(self.run, [NewEvent(type_, data)]))

    def do(self, op: tuple) -> None:
        kind = op[0]
        if kind == "act":
            self.add("agent.acted", {"session": 1, "kind": "command", "summary": f"ls {op[1]}"})
        elif kind == "note":
            self.add("memory.written", {"path": ["notes.md", "artifacts/a.txt"][op[1] % 2],
                                        "blob": None if op[2] else BLOBS[op[1] % len(BLOBS)]})
        elif kind == "program":
            self.add("program.changed", {"program_blob": BLOBS[op[1] % len(BLOBS)]})
        elif kind == "session":
            self.add("session.started", {"session": op[1], "agent": "cmd:x"})
            self.add("session.ended", {"session": op[1], "reason": "agent-exit"})
        elif kind == "snap":
            self.store.save(self.f, self.run)
        elif kind == "exp":
            _, status, accepted, checkpoint, snap_between = op
            step, attempt = self.retry or (self.f.state.step + 1, 0)
            self.add("experiment.started", {"step": step, "attempt": attempt, "commit": f"c{step}-{attempt}",
                                            "description": f"try {step}", "params": {"x": step}})
            if snap_between:  # the next events change a row the snapshot holds
                self.store.save(self.f, self.run)
            self.add("experiment.finished", {"step": step, "attempt": attempt, "status": status,
                                             "metrics": {"val_bpb": 3.0 - step / 100, "test_bpb": 1.0},
                                             "wall_seconds": 1.0 + step})
            self.retry = (step, attempt + 1) if status == "interrupted" else None
            if status != "interrupted":
                if checkpoint:
                    self.add("checkpoint.saved", {"step": step, "blob": BLOBS[step % len(BLOBS)]})
                self.add("experiment.decided", {"step": step, "accepted": accepted, "best_before": 3.0,
                                                "best_after": 2.0, "best_commit": f"c{step}-{attempt}"})


OPS = st.one_of(
    st.tuples(st.just("act"), st.integers(0, 9)),
    st.tuples(st.just("note"), st.integers(0, 5), st.booleans()),
    st.tuples(st.just("program"), st.integers(0, 5)),
    st.tuples(st.just("session"), st.integers(1, 4)),
    st.just(("snap",)),
    st.tuples(st.just("exp"), st.sampled_from(["ok", "ok", "crashed", "interrupted"]), st.booleans(),
              st.booleans(), st.booleans()),
)


def created(**extra) -> dict:
    return {**sample_payloads()["run.created"], **extra}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parent_ops=st.lists(OPS, max_size=40), fork_ops=st.lists(OPS, max_size=25), cut=st.floats(0, 1),
       chain=st.integers(1, 4))
def test_a_fold_from_snapshots_equals_the_whole_fold(parent_ops, fork_ops, cut, chain):
    with tempfile.TemporaryDirectory() as tmp, EventLog.open(Path(tmp) / "events.db", synchronous="OFF") as log, \
            pytest.MonkeyPatch.context() as mp:
        mp.setattr(folded, "CHAIN", chain)
        log.append("p", [NewEvent("run.created", created())])
        w = Writer(log, "p")
        for op in parent_ops:
            w.do(op)
        head = log.head("p")[0]
        for n in range(head + 1):
            assert view(fold_history(log, "p", n)) == truth(log, "p", n), n
        at = int(cut * head)
        [prev] = [e.hash for e in log.read("p", from_n=at, until_n=at)]
        log.append("f", [NewEvent("run.created", created(parent={"run": "p", "n": at, "step": 0}))], prev=prev)
        w = Writer(log, "f")
        for op in fork_ops:
            w.do(op)
        for n in range(log.head("f")[0] + 1):
            assert view(fold_history(log, "f", n)) == truth(log, "f", n), n


def test_every_type_the_fold_skips_only_moves_the_position():
    for type_, data in sample_payloads().items():
        if type_ in folded.TYPES:
            continue
        e = _event(type_, data)
        f = Folded()
        f.add([e])
        assert (f.state, f.mem, f.metric_of, f.new) == (RunState(position=e.n), MemoryFiles(), {}, {}), type_


def _event(type_: str, data: dict):
    from rloopd.log import Event

    return Event(1, "id", "r", 7, type_, 1, "2026-01-01T00:00:00.000000Z", data, "", SHA)


@pytest.fixture
def long_run(tmp_path):
    """A run of 60 experiments with snapshots every 25 events, chains of 3."""
    log = EventLog.open(tmp_path / "events.db", synchronous="OFF")
    log.append("r", [NewEvent("run.created", created())])
    w = Writer(log, "r")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(folded, "CHAIN", 3)
        for i in range(60):
            w.do(("act", i))
            w.do(("exp", "ok", i % 3 == 0, i % 3 == 0, False))
            if i % 4 == 0:
                w.do(("note", i, False))
            if log.head("r")[0] - (w.f.parts[-1].n if w.f.parts else 0) >= 25:
                w.do(("snap",))
    yield log
    log.close()


def snapshots(log: EventLog) -> list[tuple[str, int]]:
    return log.conn.execute("SELECT stream, n FROM fold_snapshots ORDER BY n").fetchall()


def test_a_snapshot_is_used_and_damage_falls_back_to_the_events(long_run):
    log = long_run
    head = log.head("r")[0]
    whole = truth(log, "r")
    f = fold_history(log, "r")
    assert f.parts and f.since < 30, "the fold starts from the latest snapshot"
    assert view(f) == whole
    snaps = snapshots(log)
    assert len(snaps) >= 8
    last = snaps[-1][1]
    # the state of the latest snapshot damaged: an older one is used
    log.conn.execute("UPDATE fold_snapshots SET state = replace(state, '\"accepted\":', '\"accepted\": ') "
                     "WHERE n = ?", (last,))
    f = fold_history(log, "r")
    assert f.parts[-1].n < last and view(f) == whole
    # the rows of a chain's whole snapshot damaged: the rows are rebuilt from the events
    log.conn.execute("UPDATE fold_snapshots SET rows = replace(rows, '\"ok\"', '\"oom\"') WHERE length = 0")
    f = fold_history(log, "r")
    assert f.rows == whole[3] and view(f) == whole
    # a link missing from every chain, then snapshots made by other fold code: the events alone
    log.conn.execute("DELETE FROM fold_snapshots WHERE length = 1")
    assert view(fold_history(log, "r")) == whole
    log.conn.execute("UPDATE fold_snapshots SET fold = 'other'")
    f = fold_history(log, "r")
    assert not f.parts and f.since == head + 1 and view(f) == whole


def test_a_snapshot_of_another_log_is_not_used(long_run, tmp_path):
    """Snapshots copied beside a log whose events differ (same stream, same n) name other hashes."""
    other = EventLog.open(tmp_path / "other.db", synchronous="OFF")
    other.append("r", [NewEvent("run.created", created(name="other"))])
    w = Writer(other, "r")
    for i in range(70):
        w.do(("exp", "ok", i % 2 == 0, False, False))
    rows = long_run.conn.execute("SELECT * FROM fold_snapshots").fetchall()
    other.conn.execute(folded.SCHEMA)
    other.conn.executemany(f"INSERT INTO fold_snapshots VALUES ({','.join('?' * len(rows[0]))})", rows)
    f = fold_history(other, "r")
    assert not f.parts and view(f) == truth(other, "r")
    other.close()


def test_snapshots_written_by_the_loop_serve_forks_and_replay_stays_clean(home, tmp_path, monkeypatch):
    monkeypatch.setattr(folded, "EVERY", 6)
    monkeypatch.setattr(folded, "CHAIN", 2)
    run = runs.create_run(home, make_lab(tmp_path), agent="random", experiments=14, budget=None, seed=5,
                          name="long")
    Loop(home, run).run()
    assert len(snapshots(home.log)) >= 5
    for step in (3, 9, 14):
        stream, n = fork_point(home, run, step)
        assert view(fold_history(home.log, stream, n)) == truth(home.log, stream, n)
        fork = fork_run(home, run, step, experiments=2)
        assert (home.run_dir(fork) / "memory" / "results.tsv").read_text() == truth(home.log, fork)[4]
        assert replay(home, fork).ok, replay(home, fork).divergences  # the fork's directory, before it runs
        Loop(home, fork).run()
        assert view(fold_history(home.log, fork)) == truth(home.log, fork)
        report = replay(home, fork)
        assert report.ok, report.divergences
    assert len({s for s, _ in snapshots(home.log)}) >= 2, "forks that ran store their own snapshots"
