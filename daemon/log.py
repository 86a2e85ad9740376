"""The only writer of events: an append-only, hash-chained SQLite event log with per-stream chains.

Layout and rules are DESIGN.md section 3. Every append runs in `BEGIN IMMEDIATE`, computes
`hash = sha256(prev + canonical)` per event, and is idempotent by event id, so a client that retries
after a lost acknowledgement never records an event twice. Triggers refuse UPDATE and DELETE; the
chain (checked by `rloopd.audit`) catches anything that goes around them.

Example:
    log = EventLog.open(home / "events.db")
    [ev] = log.append("home", [NewEvent("daemon.started", {"version": "0.1.0"})])
    assert log.head("home") == (0, ev.hash)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import c_make_encoder, encode_basestring
from pathlib import Path
from typing import Any

import sqlite_utils
from pydantic import BaseModel
from pydantic_core import from_json

from rloopd import events as ev
from rloopd.errors import LogCorrupt, PayloadInvalid, StaleRun, StreamNotFound

APPLICATION_ID = 0x524C4F50  # "RLOP": marks an rloopd events.db
SCHEMA_VERSION = 1
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")

# Where a step started and was decided, found without a scan: a fork's position at any log size. The
# json_valid guard keeps a row whose data is not JSON (a tampered one, for audit to name) storable.
STEP = "(CASE WHEN json_valid(data) THEN json_extract(data, '$.step') END)"
STEP_INDEX = f"""CREATE INDEX IF NOT EXISTS events_step ON events (stream, type, {STEP}, n)
    WHERE type IN ('experiment.started', 'experiment.decided')"""

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS events (
        seq    INTEGER PRIMARY KEY,
        id     TEXT NOT NULL UNIQUE,
        stream TEXT NOT NULL,
        n      INTEGER NOT NULL,
        type   TEXT NOT NULL,
        v      INTEGER NOT NULL,
        at     TEXT NOT NULL,
        data   TEXT NOT NULL,
        prev   TEXT NOT NULL,
        hash   TEXT NOT NULL,
        UNIQUE (stream, n)
    )""",
    "CREATE INDEX IF NOT EXISTS events_type ON events (type, seq)",
    STEP_INDEX,
    """CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
       BEGIN SELECT RAISE(ABORT, 'events are append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
       BEGIN SELECT RAISE(ABORT, 'events are append-only: DELETE refused'); END""",
]


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
# The C encoder `_CANONICAL.encode` builds on every call, built once (audit serializes every stored payload
# again): the same settings, without the cycle check, which JSON data has no use for.
_C_CANONICAL = None if c_make_encoder is None else c_make_encoder(
    None, _CANONICAL.default, encode_basestring, None, ":", ",", True, False, False)


def canonical_json(value: Any) -> str:
    """The one serialization two machines agree on: sorted keys, no spaces, UTF-8 kept, no NaN.

    Same bytes as `json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`.
    """
    if _C_CANONICAL is None:
        return _CANONICAL.encode(value)
    return "".join(_C_CANONICAL(value, 0))


def parse_json(text: str) -> Any:
    """`json.loads(text)`, through pydantic-core's parser where it can: two to three times faster (audit
    parses every stored payload), the same value for anything a JSON encoder writes (a test holds them
    equal); what it refuses (a lone surrogate escape, say) json.loads reads, or refuses with its own error."""
    try:
        return from_json(text)
    except ValueError:
        try:
            return json.loads(text)
        except RecursionError:  # nested deeper than Python's parser recurses: no payload is
            raise ValueError("nested too deeply to parse") from None


def canonical_event(stream: str, n: int, type_: str, v: int, at: str, data_text: str) -> str:
    """`canonical_json({"stream", "n", "type", "v", "at", "data"})` built around already-canonical data.

    Equal to serializing the whole dict (sorted keys put "at" < "data" < "n" < "stream" < "type" < "v"),
    without parsing and re-serializing the payload on the append path; a test checks the equality.
    """
    return f'{{"at":"{at}","data":{data_text},"n":{n},"stream":{_json_str(stream)},"type":{_json_str(type_)},"v":{v}}}'


@functools.lru_cache(maxsize=4096)
def _json_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def chain_hash(prev: str, canonical: str) -> str:
    return hashlib.sha256((prev + canonical).encode("utf-8")).hexdigest()


def event_hash(prev: str, stream: str, n: int, type_: str, v: int, at: str, data_text: str) -> str:
    """`chain_hash(prev, canonical_event(...))` in one step (audit hashes every stored event; a test holds
    the two equal)."""
    return hashlib.sha256(f'{prev}{{"at":"{at}","data":{data_text},"n":{n},"stream":{_json_str(stream)},'
                          f'"type":{_json_str(type_)},"v":{v}}}'.encode()).hexdigest()


def utc_now() -> str:
    """UTC, ISO 8601 with microseconds and `Z`, e.g. 2026-11-26T21:48:16.123456Z."""
    seconds, micros = divmod(time.time_ns() // 1000, 1_000_000)
    return f"{_utc_second(seconds)}.{micros:06d}Z"


@functools.lru_cache(maxsize=8)
def _utc_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def new_id() -> str:
    """A random 128-bit event id (hex), as unique as a uuid4 and cheaper on the append path."""
    return os.urandom(16).hex()


@dataclass
class NewEvent:
    """An event to append: its type, its payload (model or dict) and an id that makes retries no-ops."""

    type: str
    data: BaseModel | dict[str, Any]
    id: str = field(default_factory=new_id)


@dataclass(frozen=True)
class Event:
    seq: int
    id: str
    stream: str
    n: int
    type: str
    v: int
    at: str
    data: dict[str, Any]
    prev: str
    hash: str

    def payload(self) -> ev.Payload:
        """The payload as today's model (`data` was upcast when read; a newer version is refused)."""
        return ev.decode(self.type, max(self.v, ev.current_version(self.type)), self.data)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "stream": self.stream, "n": self.n, "type": self.type, "v": self.v,
            "at": self.at, "data": self.data, "prev": self.prev, "hash": self.hash, "id": self.id,
        }


_COLUMNS = "seq, id, stream, n, type, v, at, data, prev, hash"


def _row_event(row: Sequence[Any]) -> Event:
    """An event as readers fold it: `data` in today's shape (older payload versions upcast, DESIGN section 3),
    `v` the version that was stored. Audit, export and the chain read the stored text, never this. A stored
    text that is not a JSON object (a damaged row) is PayloadInvalid naming the event, never a parser's
    traceback; `rloopd audit` lists every such event."""
    try:
        data = json.loads(row[7])
    except (ValueError, RecursionError) as e:
        raise PayloadInvalid(f"stream {row[2]} n={row[3]}: the stored {row[4]} payload is not JSON ({e}); "
                             "`rloopd audit` lists every damaged event") from None
    if type(data) is not dict:
        kind = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(data), "null")
        raise PayloadInvalid(f"stream {row[2]} n={row[3]}: the stored {row[4]} payload is {kind}, not a JSON "
                             "object; `rloopd audit` lists every damaged event")
    return Event(row[0], row[1], row[2], row[3], row[4], row[5], row[6], as_read(row[4], row[5], data), row[8],
                 row[9])


def as_read(type_: str, v: int, data: dict[str, Any]) -> dict[str, Any]:
    """A stored payload (a JSON object) as readers fold it: upcast to today's version of its type, and a field
    it lacks (one added, with its default, after the event was written) at its default."""
    known = ev.TYPES.get(type_)
    if known is None:
        return data
    if v < known[0]:
        data = ev.upcast(type_, v, data)
    count, defaults = _defaults(type_)
    if len(data) != count:
        data = {**data, **{k: copy.deepcopy(d) for k, d in defaults.items() if k not in data}}
    return data


@functools.cache
def _defaults(type_: str) -> tuple[int, dict[str, Any]]:
    """(number of fields, {field: default}) of a known type's payload model. Payloads are stored with every
    field of their model; one written before a field was added lacks it, and is read with its default."""
    fields = ev.TYPES[type_][1].model_fields
    return len(fields), {name: f.get_default(call_default_factory=True) for name, f in fields.items()
                         if not f.is_required()}


class _HeadMoved(Exception):
    """The remembered head of a stream is stale: another writer appended to it."""


class EventLog:
    """One connection to events.db. Use one per thread; several processes may append concurrently."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self.db = sqlite_utils.Database(conn)
        self._heads: dict[str, tuple[int, str]] = {}  # stream -> (n, hash) after this connection's append

    @classmethod
    def open(cls, path: Path, *, synchronous: str = "FULL", busy_timeout_ms: int = 30_000,
             create: bool = True) -> EventLog:
        """Open (and, with `create`, initialise) the log at `path`; refuse files that are not rloopd logs."""
        path = Path(path)
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, not {synchronous!r}")
        if not create and not path.exists():
            raise LogCorrupt(f"{path}: no event log here")
        try:
            conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise LogCorrupt(f"{path}: not an rloopd event log ({e})") from None
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
            conn.close()
            raise LogCorrupt(f"{path}: not an rloopd event log (a different SQLite database)")
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            if app_id == 0:
                cls._create(conn)
            elif not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events_step'").fetchone():
                conn.execute(STEP_INDEX)  # a log made before the index: built once, compatible both ways
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            conn.close()
            raise LogCorrupt(f"{path}: cannot open the event log: {e}") from None
        if version > SCHEMA_VERSION:
            conn.close()
            raise LogCorrupt(f"{path}: log schema v{version} is newer than this rloopd (v{SCHEMA_VERSION})")
        return cls(conn, path)

    @staticmethod
    def _create(conn: sqlite3.Connection) -> None:
        """Create the schema and stamp the file, in one transaction, so a racing creator sees all or nothing."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA application_id").fetchone()[0] == 0:
                for statement in SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writing ---------------------------------------------------------------------------------

    def append(self, stream: str, new: Iterable[NewEvent], *, expected_n: int | None = None,
               prev: str | None = None) -> list[Event]:
        """Append events to `stream` in one transaction and return them as stored.

        `expected_n` is the position the first event must take (optimistic concurrency: another writer
        got there first -> StaleRun). `prev` starts a new stream's chain from another hash (a fork's
        parent event). Appending events whose ids are all stored already returns the stored ones.
        """
        new = list(new)
        if not new:
            return []
        if not stream or stream != stream.strip():
            raise StreamNotFound(f"invalid stream name {stream!r}")
        prepared = []
        for e in new:
            data = ev.validate(e.type, e.data)
            prepared.append((e.id, e.type, ev.current_version(e.type), data, canonical_json(data)))
        try:
            return self._append_once(stream, prepared, expected_n, prev, cached=True)
        except _HeadMoved:  # another writer appended since this connection last did: read the head
            self._heads.pop(stream, None)
            return self._append_once(stream, prepared, expected_n, prev, cached=False)

    def _append_once(self, stream: str, prepared: list[tuple], expected_n: int | None, prev: str | None,
                     cached: bool) -> list[Event]:
        """One attempt. A head remembered from this connection's last append saves a query; if another
        writer moved the stream since, the insert meets UNIQUE(stream, n) and raises `_HeadMoved`."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            head = self._heads.get(stream) if cached else None
            from_cache = head is not None
            if head is None:
                head = conn.execute(
                    "SELECT n, hash FROM events WHERE stream = ? ORDER BY n DESC LIMIT 1", (stream,)
                ).fetchone()
            n, link = (head[0] + 1, head[1]) if head else (0, prev or "")
            if expected_n is not None and expected_n != n:
                conn.execute("ROLLBACK")
                if from_cache:
                    raise _HeadMoved
                stale = f"stream {stream}: expected to append at n={expected_n}, but the next n is {n}"
                return self._retried(stream, [p[0] for p in prepared], stale)
            at = utc_now()
            rows = []
            for id_, type_, v, _data, data_text in prepared:
                h = chain_hash(link, canonical_event(stream, n, type_, v, at, data_text))
                rows.append((id_, stream, n, type_, v, at, data_text, link, h))
                link, n = h, n + 1
            # seq is INTEGER PRIMARY KEY: inside this write transaction the rows take consecutive values.
            sql = "INSERT INTO events (id, stream, n, type, v, at, data, prev, hash) VALUES (?,?,?,?,?,?,?,?,?)"
            if len(rows) == 1:
                last = conn.execute(sql, rows[0]).lastrowid
            else:
                conn.executemany(sql, rows)
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            stored = self._by_ids([p[0] for p in prepared])
            if not stored and from_cache:
                raise _HeadMoved from None
            return self._retried(stream, [p[0] for p in prepared])
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._heads.pop(stream, None)
            raise
        self._heads[stream] = (rows[-1][2], rows[-1][8])
        first = last - len(rows) + 1
        return [Event(first + i, r[0], stream, r[2], r[3], r[4], at, p[3], r[7], r[8])
                for i, (r, p) in enumerate(zip(rows, prepared, strict=True))]

    def _retried(self, stream: str, ids: list[str], stale: str = "") -> list[Event]:
        """An append was refused: if every event is stored already it was a retry, so return them."""
        stored = self._by_ids(ids)
        if stored and len(stored) == len(ids) and all(s.stream == stream for s in stored):
            return stored
        raise StaleRun(stale or f"stream {stream}: an event id is already stored with other events")

    def append_one(self, stream: str, type_: str, data: BaseModel | dict[str, Any], **kw: Any) -> Event:
        return self.append(stream, [NewEvent(type_, data)], **kw)[0]

    def insert_stored(self, rows: Sequence[Sequence[Any]], then: Sequence[tuple[str, NewEvent]] = ()) -> int:
        """Insert events hashed on another home (an imported archive's) as they are, and return how many were new.

        Each row is (id, stream, n, type, v, at, data text, prev, hash); only `seq` is this home's. The caller
        verifies the chains first. A row stored identically already is skipped, so importing twice adds
        nothing; one that meets another event at its (stream, n), or whose id names another event, raises
        StaleRun and nothing is written. `then` appends this home's own events (the record of the import) in
        the same transaction, and only if a row was new, so neither is ever stored without the other.
        """
        conn = self.conn
        sql = "INSERT INTO events (id, stream, n, type, v, at, data, prev, hash) VALUES (?,?,?,?,?,?,?,?,?)"
        conn.execute("BEGIN IMMEDIATE")
        try:
            inserted = 0
            for row in rows:
                try:
                    conn.execute(sql, tuple(row))
                    inserted += 1
                except sqlite3.IntegrityError:  # the statement alone is undone; the transaction goes on
                    there = conn.execute("SELECT id, hash FROM events WHERE stream = ? AND n = ?",
                                         (row[1], row[2])).fetchone()
                    if there != (row[0], row[8]):
                        raise StaleRun(f"stream {row[1]} n={row[2]}: another event is stored there, "
                                       f"or event id {row[0]} is another event's") from None
            for stream, e in then if inserted else ():
                data = ev.validate(e.type, e.data)
                text, v, at = canonical_json(data), ev.current_version(e.type), utc_now()
                head = conn.execute("SELECT n, hash FROM events WHERE stream = ? ORDER BY n DESC LIMIT 1",
                                    (stream,)).fetchone()
                n, link = (head[0] + 1, head[1]) if head else (0, "")
                conn.execute(sql, (e.id, stream, n, e.type, v, at, text, link,
                                   chain_hash(link, canonical_event(stream, n, e.type, v, at, text))))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        finally:
            for stream in {r[1] for r in rows} | {s for s, _ in then}:
                self._heads.pop(stream, None)
        return inserted

    # --- reading ---------------------------------------------------------------------------------

    def _by_ids(self, ids: list[str]) -> list[Event]:
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM events WHERE id IN ({marks}) ORDER BY seq", ids)
        return [_row_event(r) for r in rows]

    def stream_of(self, event_id: str) -> str | None:
        """The stream holding the event with this id, if any: a retried command's request id is its event id."""
        row = self.conn.execute("SELECT stream FROM events WHERE id = ?", (event_id,)).fetchone()
        return row[0] if row else None

    def head(self, stream: str) -> tuple[int, str] | None:
        """(n, hash) of the stream's last event, or None for an empty stream."""
        row = self.conn.execute(
            "SELECT n, hash FROM events WHERE stream = ? ORDER BY n DESC LIMIT 1", (stream,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def read(self, stream: str | None = None, *, types: Sequence[str] = (), after_seq: int = 0,
             from_n: int = 0, until_n: int | None = None, limit: int | None = None) -> Iterator[Event]:
        """Events in global order, filtered by stream, types, a seq position or a stream range."""
        where, args = ["seq > ?"], [after_seq]
        if stream is not None:
            where.append("stream = ?")
            args.append(stream)
            if from_n:
                where.append("n >= ?")
                args.append(from_n)
            if until_n is not None:
                where.append("n <= ?")
                args.append(until_n)
        if types:
            where.append(f"type IN ({','.join('?' * len(types))})")
            args.extend(types)
        sql = f"SELECT {_COLUMNS} FROM events WHERE {' AND '.join(where)} ORDER BY seq"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for row in self.conn.execute(sql, args).fetchall():
            yield _row_event(row)

    def follow(self, stream: str | None = None, *, types: Sequence[str] = (), after_seq: int = 0,
               poll_seconds: float = 0.2, stop: Any = None) -> Iterator[Event]:
        """Read, then keep yielding new events as other writers append them, until `stop()` is true."""
        while True:
            got = False
            for e in self.read(stream, types=types, after_seq=after_seq):
                after_seq, got = e.seq, True
                yield e
            if stop is not None and stop():
                return
            if not got:
                time.sleep(poll_seconds)

    def step_event(self, stream: str, type_: str, step: int, until_n: int | None = None) -> int | None:
        """n of the first `experiment.started` or `experiment.decided` (`type_`) of `step` in `stream`, at or
        before `until_n`; None if there is none. An index lookup (`events_step`), not a scan."""
        return self.conn.execute(
            "SELECT MIN(n) FROM events WHERE type IN ('experiment.started', 'experiment.decided') AND type = ? "
            f"AND stream = ? AND {STEP} = ? AND n <= ?",
            (type_, stream, step, 2**62 if until_n is None else until_n)).fetchone()[0]

    def last_seq(self) -> int:
        return self.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def streams(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT stream FROM events ORDER BY stream")]

    def runs(self) -> list[Event]:
        """The `run.created` event of every run, oldest first."""
        return list(self.read(types=["run.created"]))

    def resolve(self, name: str) -> str:
        """A stream from `home`, `batch:<id>`, a run id, a unique run-id prefix, or a run name."""
        if name in ("home",) or name.startswith("batch:"):
            if self.head(name) is None:
                raise StreamNotFound(f"no stream {name!r} in {self.path}")
            return name
        runs = self.runs()
        for pool in ([r for r in runs if r.stream == name], [r for r in runs if r.data.get("name") == name],
                     [r for r in runs if r.stream.startswith(name)]):
            ids = sorted({r.stream for r in pool})
            if len(ids) == 1:
                return ids[0]
            if len(ids) > 1:
                raise StreamNotFound(f"{name!r} is ambiguous: it matches runs {', '.join(ids)}")
        raise StreamNotFound(f"no run or stream named {name!r} in {self.path}")
