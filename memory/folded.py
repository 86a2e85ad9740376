"""The fold of a run's history that the loop, forks and status read, and its snapshots in events.db.

A run's state, its memory files and its experiment rows (results.tsv) are folds over its history (DESIGN
section 4). Folding a million events takes seconds, and a fork must cost the same at any log size (DESIGN
section 5), so the loop stores a snapshot of the fold every `EVERY` events in the table `fold_snapshots`,
keyed by (stream, n), and `fold_history` starts from the nearest snapshot at or before a position and folds
only the events after it, reading only the types the fold looks at.

A snapshot is a cache; it never changes a result:
- it names the hash of the event it was folded up to and is used only while that event is stored with that
  hash (which chains every event before it, a fork's parent prefix included);
- it names the fold code that made it (a digest of the modules that fold and store), so snapshots made by
  other code are ignored, never trusted;
- its parts carry their sha256; one that is damaged or missing is passed over for an older one, or the
  fold starts from the events;
- replay never reads snapshots: it rebuilds from the events.

The experiment rows grow with the run, so a snapshot holds only the rows that are new since the snapshot
it extends (its base, possibly in a parent's stream), with their results.tsv lines; every `CHAIN`-th
snapshot of a chain holds them all. Re-projecting a fork's memory joins the stored results.tsv lines of the
chain and parses no row; the rows themselves are read only when asked for (by a loop continuing the run).
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from rloopd import events as ev
from rloopd.log import Event, EventLog
from rloopd.memory import experiments as ex
from rloopd.memory import rundir
from rloopd.memory import state as st
from rloopd.memory.rundir import MemoryFiles
from rloopd.memory.state import Attempt, RunState

EVERY = 2000  # the loop stores a snapshot once this many events were folded since the last one
CHAIN = 32  # a chain's snapshots hold only their new rows, up to this many; then one holds every row
TYPES = tuple(sorted(st.FOLDED_TYPES | MemoryFiles.TYPES | set(ex.TYPES)))  # any other type only moves n
COLUMNS = list(ex.COLUMNS)
LAST = 2**62  # "no upper bound" for an n

SCHEMA = """CREATE TABLE IF NOT EXISTS fold_snapshots (
    stream TEXT NOT NULL,
    n INTEGER NOT NULL,
    fold TEXT NOT NULL,
    head TEXT NOT NULL,
    base_stream TEXT,
    base_n INTEGER,
    length INTEGER NOT NULL,
    max_step INTEGER NOT NULL,
    state TEXT NOT NULL,
    tsv TEXT NOT NULL,
    rows TEXT NOT NULL,
    rows_digest TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (stream, n)
)"""


class Damaged(Exception):
    """A snapshot's bytes do not match its digest, or do not decode."""


@functools.cache
def fingerprint() -> str:
    """A digest of the code a snapshot depends on: the folds, this module, and the payload upcasters."""
    h = hashlib.sha256()
    for module in (st, rundir, ex, ev, sys.modules[__name__]):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _by_step(rows: dict[ex.Key, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in results.tsv order: by step and replica, ties in fold order (as the loop and replay sort)."""
    return [r for _, r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2]))]


@dataclass(frozen=True)
class _Part:
    """One snapshot of the chain a fold's rows come from: its results.tsv lines, and where its rows are."""

    stream: str
    n: int
    tsv: str
    rows_digest: str


class _Stored(NamedTuple):
    """What `FoldSnapshots` reads of a snapshot to follow its chain (its rows are read when needed)."""

    base_stream: str | None
    base_n: int | None
    length: int
    max_step: int
    state: str
    tsv: str
    rows_digest: str


class Folded:
    """RunState, MemoryFiles and experiment rows of one history, folded together (DESIGN section 4).

    The rows are the base (those of the snapshot chain the fold started from, left as stored text until
    someone asks for rows) and `new` (rows that events touched since, all of steps above the base's). An
    event about a row the base may hold merges the two first, so the result never depends on the split.
    """

    def __init__(self, store: FoldSnapshots | None = None):
        self.store = store
        self.state = RunState()
        self.mem = MemoryFiles()
        self.metric_of: dict[str, str] = {}
        self.new: dict[ex.Key, dict[str, Any]] = {}
        self.parts: list[_Part] = []  # the base's chain, oldest first
        self.base: dict[ex.Key, dict[str, Any]] | None = {}  # the base rows; None until read
        self.base_max = -1  # the highest step of a base row
        self.since = 0  # events folded since the base snapshot (or the start): when the next one is due

    def add(self, events: Iterable[Event], last_n: int | None = None, count: int | None = None) -> None:
        """Fold `events` (one stream, in order). When events of types the fold ignores were left out of a
        range, `last_n` is the n of the range's last event (the position moves there) and `count` its size."""
        seen, last = 0, None
        for e in events:
            seen, last = seen + 1, e.n
            t = e.type
            if t in st.FOLDED_TYPES:
                self.state = st.apply(self.state, e)
            if t in MemoryFiles.TYPES:
                self.mem.apply(e)
            if t in ex.TYPES:
                if t != "run.created" and e.data["step"] <= self.base_max:
                    self._merge()
                ex.apply(self.new, e, self.metric_of)
        last = last_n if last_n is not None else last
        if last is not None and self.state.position != last:
            self.state = replace(self.state, position=last)
        self.since += seen if count is None else count

    def _merge(self) -> None:
        """Make every row a `new` one (a base row is about to change): the next snapshot holds them all."""
        rows = self.base_rows()
        rows.update(self.new)
        self.new, self.parts, self.base, self.base_max = rows, [], {}, -1

    def base_rows(self) -> dict[ex.Key, dict[str, Any]]:
        if self.base is None:
            try:
                self.base = self.store.rows(self.parts)
            except Damaged:  # unreadable stored rows: rebuild them from the events; that chain ends here
                top = self.parts[-1]
                rebuilt = fold_history(self.store.log, top.stream, top.n, snapshots=False).rows
                self.new, self.parts, self.base, self.base_max = {**rebuilt, **self.new}, [], {}, -1
        return self.base

    @property
    def rows(self) -> dict[ex.Key, dict[str, Any]]:
        """Every experiment row of the history, as `experiments.rebuild` would give them."""
        return {**self.base_rows(), **self.new}

    def results_tsv(self, metric: str) -> str:
        """memory/results.tsv: the chain's stored lines, then those of the newer rows (all of later steps)."""
        return ex.results_tsv([], metric) + "".join(p.tsv for p in self.parts) + ex.results_lines(_by_step(self.new))

    def state_text(self) -> str:
        return json.dumps({
            "state": asdict(self.state), "metric_of": self.metric_of,
            "mem": {"program_blob": self.mem.program_blob, "files": self.mem.files,
                    "checkpoint_blob": self.mem.checkpoint_blob,
                    "pending_checkpoint": sorted(self.mem.pending_checkpoint.items()),
                    "policy": self.mem.policy, "visible": self.mem.visible, "inherited": self.mem.inherited}},
            sort_keys=True, separators=(",", ":"))

    def load_state(self, text: str) -> None:
        try:
            d = json.loads(text)
            s = d["state"]
            attempts = {k: Attempt(**s[k]) for k in ("in_flight", "retry") if s[k] is not None}
            self.state = RunState(**{**s, **attempts})
            m = d["mem"]
            self.mem = MemoryFiles(m["program_blob"], dict(m["files"]), m["checkpoint_blob"],
                                   {int(k): v for k, v in m["pending_checkpoint"]}, m["policy"], dict(m["visible"]),
                                   m["inherited"])
            self.metric_of = dict(d["metric_of"])
        except (ValueError, KeyError, TypeError) as e:
            raise Damaged(f"state: {e}") from None


def _digest(fold: str, head: str, base: tuple[str | None, int | None], length: int, max_step: int,
            state: str, tsv: str, rows_digest: str) -> str:
    return _sha("\0".join(map(str, (fold, head, *base, length, max_step, rows_digest, state, tsv))))


class FoldSnapshots:
    """The `fold_snapshots` table: written by whoever folds a run far (the loop, a fork), read by
    `fold_history`. Creating the table waits for the first write, so readers never write."""

    def __init__(self, log: EventLog):
        self.log = log

    def _exists(self) -> bool:
        return self.log.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'fold_snapshots'").fetchone() is not None

    def save_if_due(self, f: Folded, stream: str) -> None:
        """Save `f` when `EVERY` events or more were folded since its base: a run or fork that folded far."""
        if f.since >= EVERY:
            self.save(f, stream)

    def save(self, f: Folded, stream: str) -> None:
        """Store `f` as the snapshot at (stream, its position), extending the chain it came from when that
        chain is short, and make that snapshot `f`'s base. Idempotent: the same fold gives the same row."""
        conn = self.log.conn
        n = f.state.position
        if f.parts and (f.parts[-1].stream, f.parts[-1].n) == (stream, n):
            return  # already stored at this position; saving again would make the snapshot its own base
        head = conn.execute("SELECT hash FROM events WHERE stream = ? AND n = ?", (stream, n)).fetchone()[0]
        new_lines = ex.results_lines(_by_step(f.new))
        if f.parts and len(f.parts) < CHAIN:
            rows, tsv, base, length = f.new, new_lines, (f.parts[-1].stream, f.parts[-1].n), len(f.parts)
        else:
            rows, base, length = f.rows, (None, None), 0
            tsv = "".join(p.tsv for p in f.parts) + new_lines
        max_step = max([f.base_max, *(k[1] for k in f.new)])
        rows_text = json.dumps([[r[c] for c in COLUMNS] for r in rows.values()], separators=(",", ":"))
        rows_digest, state = _sha(rows_text), f.state_text()
        digest = _digest(fingerprint(), head, base, length, max_step, state, tsv, rows_digest)
        if not self._exists():
            conn.execute(SCHEMA)
        conn.execute("INSERT OR REPLACE INTO fold_snapshots VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                     (stream, n, fingerprint(), head, *base, length, max_step, state, tsv, rows_text, rows_digest,
                      digest))
        part = _Part(stream, n, tsv, rows_digest)
        if length:
            f.parts.append(part)
            if f.base is not None:
                f.base.update(f.new)
        else:
            f.parts, f.base = [part], dict(rows)
        f.new, f.base_max, f.since = {}, max_step, 0

    def load(self, stream: str, until_n: int | None) -> Folded | None:
        """The fold as of the latest usable snapshot of `stream` at or before `until_n`, or None."""
        if not self._exists():
            return None
        until = LAST if until_n is None else until_n
        while True:
            n = self.log.conn.execute("SELECT MAX(n) FROM fold_snapshots WHERE stream = ? AND n <= ? AND fold = ?",
                                      (stream, until, fingerprint())).fetchone()[0]
            if n is None:
                return None
            try:
                return self._chain(stream, n)
            except Damaged:
                until = n - 1

    def _link(self, stream: str, n: int) -> _Stored:
        """One snapshot, if it is for this log (its event is stored with its hash) and this code, and intact."""
        row = self.log.conn.execute(
            "SELECT s.base_stream, s.base_n, s.length, s.max_step, s.state, s.tsv, s.rows_digest, s.head, s.digest "
            "FROM fold_snapshots s JOIN events e ON e.stream = s.stream AND e.n = s.n AND e.hash = s.head "
            "WHERE s.stream = ? AND s.n = ? AND s.fold = ?", (stream, n, fingerprint())).fetchone()
        if row is None:
            raise Damaged(f"no snapshot at {stream} n={n} for this log and this code")
        got = _Stored(*row[:7])
        if _digest(fingerprint(), row[7], (got.base_stream, got.base_n), got.length, got.max_step, got.state,
                   got.tsv, got.rows_digest) != row[8]:
            raise Damaged(f"snapshot at {stream} n={n}: its bytes do not match its digest")
        return got

    def _chain(self, stream: str, n: int) -> Folded:
        """The fold stored at (stream, n), its rows left in the chain of snapshots it extends."""
        f = Folded(self)
        link = self._link(stream, n)
        f.load_state(link.state)
        if f.state.position != n:
            raise Damaged(f"snapshot at {stream} n={n} holds position {f.state.position}")
        f.base, f.base_max = None, link.max_step
        at = (stream, n)
        for _ in range(CHAIN + 1):
            f.parts.append(_Part(*at, link.tsv, link.rows_digest))
            if link.length == 0:
                f.parts.reverse()
                return f
            at, length = (link.base_stream, link.base_n), link.length
            link = self._link(*at)
            if link.length != length - 1:
                raise Damaged(f"snapshot chain broken at {at[0]} n={at[1]}")
        raise Damaged(f"snapshot chain from {stream} n={n} is longer than {CHAIN}")

    def rows(self, parts: list[_Part]) -> dict[ex.Key, dict[str, Any]]:
        """The rows of a chain, oldest part first, each checked against its digest."""
        rows: dict[ex.Key, dict[str, Any]] = {}
        for p in parts:
            got = self.log.conn.execute("SELECT rows FROM fold_snapshots WHERE stream = ? AND n = ? AND rows_digest = ?",
                                        (p.stream, p.n, p.rows_digest)).fetchone()
            if got is None or _sha(got[0]) != p.rows_digest:
                raise Damaged(f"rows of the snapshot at {p.stream} n={p.n}")
            try:
                for values in json.loads(got[0]):
                    row = dict(zip(COLUMNS, values, strict=True))
                    rows[(row["run"], row["step"], row["replica"])] = row
            except (ValueError, TypeError) as e:
                raise Damaged(f"rows of the snapshot at {p.stream} n={p.n}: {e}") from None
        return rows


def fold_history(log: EventLog, run: str, until_n: int | None = None, *, snapshots: bool = True) -> Folded:
    """The fold of `run`'s history (DESIGN section 5: a fork's is its parent's prefix, then its own events)
    up to its event `until_n` (its last by default): from the latest usable snapshot of the run's stream at
    or before that, else from the parent's fold at the fork position, else from nothing; then the events
    after it, reading only the types the fold looks at. `snapshots=False` folds from the events alone."""
    store = FoldSnapshots(log)
    f = store.load(run, until_n) if snapshots else None
    after = -1 if f is None else f.state.position
    if f is None:
        first = next(log.read(run, until_n=0), None)
        parent = first.data.get("parent") if first is not None and first.type == "run.created" else None
        f = fold_history(log, parent["run"], parent["n"], snapshots=snapshots) if parent else Folded(store)
    last = log.conn.execute("SELECT MAX(n) FROM events WHERE stream = ? AND n <= ?",
                            (run, LAST if until_n is None else until_n)).fetchone()[0]
    if last is not None and last > after:
        f.add(log.read(run, types=TYPES, from_n=after + 1, until_n=until_n), last_n=last, count=last - after)
    return f
