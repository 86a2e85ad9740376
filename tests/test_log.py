"""The event log: appends, reads, chains, concurrency and idempotency on a real SQLite file."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rloopd import events as ev
from rloopd.audit import audit
from rloopd.errors import LogCorrupt, PayloadInvalid, StaleRun, StreamNotFound, UnknownEventType
from rloopd.log import EventLog, NewEvent, canonical_event, canonical_json, chain_hash, event_hash, parse_json

from .conftest import sample_payloads


def test_every_event_type_round_trips(home):
    samples = sample_payloads(home.blobs.put(b"x"))
    assert set(samples) == set(ev.TYPES), "the sample set must cover the whole catalogue"
    stored = home.log.append("run-a", [NewEvent(t, d) for t, d in samples.items()])
    back = list(home.log.read("run-a"))
    assert [e.type for e in back] == list(samples)
    assert [e.n for e in back] == list(range(len(samples)))
    for e in back:
        model = e.payload()
        assert isinstance(model, ev.TYPES[e.type][1])
        assert e.data == ev.validate(e.type, samples[e.type])
    assert [e.hash for e in stored] == [e.hash for e in back]
    assert back[0].prev == "" and all(b.prev == a.hash for a, b in zip(back, back[1:], strict=False))


def test_hash_is_sha256_of_prev_and_canonical_json(home):
    a = home.log.append_one("s", "run.paused", {"by": "me", "reason": "é ünïcode"})
    b = home.log.append_one("s", "run.resumed", {"by": "me"})
    canon = json.dumps({"stream": "s", "n": 1, "type": "run.resumed", "v": 1, "at": b.at, "data": b.data},
                       sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert b.hash == chain_hash(a.hash, canon)
    raw = home.log.conn.execute("SELECT data FROM events WHERE seq = ?", (a.seq,)).fetchone()[0]
    assert raw == canonical_json(a.data) and "é" in raw


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1), st.integers(0, 10**9), st.text(),
       st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=10))
def test_fast_canonical_equals_full_serialization(stream, n, type_, data):
    at = "2026-11-26T21:48:16.123456Z"
    full = canonical_json({"stream": stream, "n": n, "type": type_, "v": 1, "at": at, "data": data})
    assert canonical_event(stream, n, type_, 1, at, canonical_json(data)) == full


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=64), st.text(min_size=1), st.integers(0, 10**9), st.text(),
       st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=10))
def test_the_fast_paths_audit_takes_equal_the_plain_ones(prev, stream, n, type_, data):
    """canonical_json (a prebuilt C encoder), parse_json (pydantic-core's parser) and event_hash (one step)
    give what json.dumps, json.loads and chain_hash(canonical_event) give."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical_json(data) == text
    back = parse_json(text)
    assert back == json.loads(text) and canonical_json(back) == text
    at = "2026-11-26T21:48:16.123456Z"
    assert event_hash(prev, stream, n, type_, 2, at, text) == chain_hash(prev, canonical_event(stream, n, type_, 2, at, text))


def test_parse_json_falls_back_to_json_loads():
    assert parse_json('"\\ud800"') == json.loads('"\\ud800"')  # pydantic-core refuses a lone surrogate
    with pytest.raises(json.JSONDecodeError):
        parse_json('{"a": 1')


def test_stale_n_conflict_appends_nothing(home):
    home.log.append_one("s", "run.paused", {})
    with pytest.raises(StaleRun, match="expected to append at n=0"):
        home.log.append("s", [NewEvent("run.resumed", {})], expected_n=0)
    assert [e.type for e in home.log.read("s")] == ["run.paused"]
    home.log.append("s", [NewEvent("run.resumed", {})], expected_n=1)
    assert home.log.head("s")[0] == 1


def test_retry_with_same_ids_is_a_noop(home):
    batch = [NewEvent("run.paused", {}), NewEvent("run.resumed", {})]
    first = home.log.append("s", batch, expected_n=0)
    again = home.log.append("s", batch, expected_n=0)  # as if the acknowledgement was lost
    assert [e.seq for e in again] == [e.seq for e in first]
    assert home.log.last_seq() == 2


def test_invalid_payload_names_the_field_and_appends_nothing(home):
    with pytest.raises(PayloadInvalid, match=r"experiment.finished payload: status"):
        home.log.append("s", [NewEvent("run.paused", {}), NewEvent("experiment.finished", {"step": 1, "status": "great"})])
    with pytest.raises(PayloadInvalid, match="metrics"):
        home.log.append_one("s", "experiment.finished", {"step": 1, "status": "ok", "metrics": {"x": float("nan")}})
    with pytest.raises(UnknownEventType):
        home.log.append_one("s", "run.exploded", {})
    assert home.log.last_seq() == 0


@pytest.mark.parametrize("sql", ["UPDATE events SET data = '{}'", "DELETE FROM events",
                                 "UPDATE events SET hash = 'x' WHERE n = 0"])
def test_update_and_delete_are_refused(home, sql):
    home.log.append_one("s", "run.paused", {})
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        home.log.conn.execute(sql)
    assert home.log.last_seq() == 1


def test_reads_by_type_position_and_follow(home):
    for i in range(5):
        home.log.append_one("a", "run.paused" if i % 2 else "run.resumed", {"reason": str(i)})
        home.log.append_one("b", "run.paused", {"reason": str(i)})
    assert [e.data["reason"] for e in home.log.read("a", types=["run.paused"])] == ["1", "3"]
    assert [e.n for e in home.log.read("a", from_n=3)] == [3, 4]
    assert len(list(home.log.read(after_seq=8))) == 2
    seen = []
    for e in home.log.follow("b", poll_seconds=0.01, stop=lambda: len(seen) >= 4):
        seen.append(e.n)
    assert seen == [0, 1, 2, 3, 4]


def test_resolve_streams(home):
    home.log.append_one("3f9a1c2b0000", "run.created", {"name": "lr-sweep", "lab": "/l"})
    home.log.append_one("3f00aaaa0000", "run.created", {"name": "other", "lab": "/l"})
    home.log.append_one("home", "daemon.started", {"version": "x"})
    assert home.log.resolve("lr-sweep") == "3f9a1c2b0000"
    assert home.log.resolve("3f9a") == "3f9a1c2b0000"
    assert home.log.resolve("home") == "home"
    with pytest.raises(StreamNotFound, match="ambiguous"):
        home.log.resolve("3f")
    with pytest.raises(StreamNotFound, match="no run or stream named 'nope'"):
        home.log.resolve("nope")
    with pytest.raises(StreamNotFound):
        home.log.resolve("batch:zzz")


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(LogCorrupt, match="not an rloopd event log"):
        EventLog.open(junk)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    before = other.read_bytes()
    with pytest.raises(LogCorrupt, match="different SQLite database"):
        EventLog.open(other)
    assert other.read_bytes() == before, "a foreign database must not be touched"


def test_synchronous_is_configurable(tmp_path):
    with EventLog.open(tmp_path / "a.db", synchronous="normal") as log:
        assert log.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
        assert log.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with EventLog.open(tmp_path / "b.db") as log:
        assert log.conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    with pytest.raises(ValueError, match="synchronous"):
        EventLog.open(tmp_path / "c.db", synchronous="sometimes")


def test_upcaster_path(home, monkeypatch):
    # A v1 payload read back after the type moved to v2: the upcaster fills the new field.
    home.log.append_one("s", "run.warned", {"about": "x", "message": "old"})
    monkeypatch.setitem(ev.TYPES, "run.warned", (2, ev.RunWarned))
    monkeypatch.setitem(ev.UPCASTERS, ("run.warned", 1), lambda d: {**d, "message": d["message"] + " (v2)"})
    [e] = home.log.read("s")
    assert e.v == 1 and e.data["message"] == "old (v2)"  # readers fold today's shape; v says what was stored
    assert e.payload().message == "old (v2)"  # upcast once, not again
    with pytest.raises(UnknownEventType, match="newer than this rloopd"):
        ev.decode("run.warned", 3, e.data)
    assert audit(home.log, home.blobs).ok  # the chain is over the stored v1 bytes


def test_session_ended_v1_reads_as_v2(home):
    """The real upcaster: session.ended v1 (tokens_in/tokens_out) is read as v2 (`usage`)."""
    data = canonical_json({"session": 1, "reason": "agent-exit", "tokens_in": 1200, "tokens_out": 80})
    at = "2026-01-01T00:00:00.000000Z"
    digest = chain_hash("", canonical_event("s", 0, "session.ended", 1, at, data))
    home.log.conn.execute("INSERT INTO events (id, stream, n, type, v, at, data, prev, hash) "
                          "VALUES ('x1', 's', 0, 'session.ended', 1, ?, ?, '', ?)", (at, data, digest))
    [e] = home.log.read("s")
    assert e.v == 1 and e.data == {"session": 1, "reason": "agent-exit", "usage": {"input": 1200, "output": 80},
                                   "exit_code": None, "cost_usd": None, "output_blob": None, "stderr_blob": None}
    assert e.payload().usage == {"input": 1200, "output": 80}
    assert audit(home.log, home.blobs).ok
    assert "tokens_in" in json.loads(home.log.conn.execute("SELECT data FROM events").fetchone()[0])
    stored_v2 = home.log.append_one("s", "session.ended", {"session": 2, "reason": "window", "usage": {"input": 5}})
    assert stored_v2.v == 2


def _appender(path: str, stream: str, count: int, start) -> None:
    start.wait()
    log = EventLog.open(path)
    for i in range(count):
        log.append_one(stream if i % 2 else "shared", "run.paused", {"reason": f"{stream}-{i}"})
    log.close()


def test_concurrent_appenders_lose_nothing(tmp_path):
    path = str(tmp_path / "events.db")
    EventLog.open(path).close()
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_appender, args=(path, s, 150, start)) for s in ("p1", "p2")]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with EventLog.open(path) as log:
        reasons = sorted(e.data["reason"] for e in log.read())
        assert reasons == sorted(f"{s}-{i}" for s in ("p1", "p2") for i in range(150))
        shared = list(log.read("shared"))
        assert [e.n for e in shared] == list(range(150))
        assert all(b.prev == a.hash for a, b in zip(shared, shared[1:], strict=False))


def test_two_connections_interleaving_on_one_stream(tmp_path):
    """Each connection remembers its last head; a stale one must notice and re-read, never fork the chain."""
    a, b = EventLog.open(tmp_path / "e.db"), EventLog.open(tmp_path / "e.db")
    a.append_one("s", "run.paused", {})
    b.append_one("s", "run.resumed", {})
    a.append_one("s", "run.paused", {})  # a's remembered head (n=0) is stale
    b.append("s", [NewEvent("run.resumed", {})], expected_n=3)
    with pytest.raises(StaleRun, match="next n is 4"):
        a.append("s", [NewEvent("run.resumed", {})], expected_n=3)
    events = list(a.read("s"))
    assert [e.n for e in events] == [0, 1, 2, 3]
    assert all(y.prev == x.hash for x, y in zip(events, events[1:], strict=False))
    a.close()
    b.close()
