"""Verify the log: every stream's hash chain, the canonical form of every stored payload, and every blob.

Audit reads the raw rows, so a changed byte anywhere in an event is caught even when it parses to the
same value (`1e-05` edited to `1E-05`): the stored data text must equal its own canonical serialization,
and the recomputed hash must equal the stored one, which the next event's `prev` must equal in turn.
A consistent rewrite of a whole stream keeps its chain valid; `expect` (head hashes kept elsewhere)
catches that.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rloopd import events as ev
from rloopd.blobs import BlobStore
from rloopd.log import EventLog, canonical_json, event_hash, parse_json


@dataclass
class Problem:
    stream: str
    n: int | None
    seq: int | None
    what: str

    def __str__(self) -> str:
        where = f"stream {self.stream}"
        if self.n is not None:
            where += f" n={self.n} seq={self.seq}"
        return f"{where}: {self.what}"


@dataclass
class StreamReport:
    stream: str
    events: int = 0
    head: str = ""


@dataclass
class AuditReport:
    streams: list[StreamReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    blobs_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def first(self) -> Problem | None:
        return min(self.problems, key=lambda p: (p.seq is None, p.seq or 0)) if self.problems else None

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "streams": [{"stream": s.stream, "events": s.events, "head": s.head} for s in self.streams],
            "blobs_checked": self.blobs_checked,
            "problems": [p.__dict__ | {"message": str(p)} for p in sorted(
                self.problems, key=lambda p: (p.seq is None, p.seq or 0))],
        }


def _fork_prev(log: EventLog, data: dict) -> str | None:
    """The hash a fork's first event must chain from: its parent's event at the fork position."""
    parent = data.get("parent") if isinstance(data, dict) else None
    if not parent or not isinstance(parent, dict):  # not a fork, or a damaged payload (its check names it)
        return None
    run, n = parent.get("run"), parent.get("n")
    if not isinstance(run, str) or type(n) is not int:
        return "<missing parent event>"
    row = log.conn.execute("SELECT hash FROM events WHERE stream = ? AND n = ?", (run, n)).fetchone()
    return row[0] if row else "<missing parent event>"


# Called with the stream, a row as read, (seq, n, type, v, at, data text, prev, hash, id), and its parsed
# data (None when it is not JSON), once the row is checked: replay folds the history in the pass that
# verifies it. Given per type (`visit[type]`), so the events nobody folds cost no call.
Visit = Callable[[str, tuple, Any], None]


def audit(log: EventLog, blobs: BlobStore | None, streams: list[str] | None = None,
          expect: dict[str, str] | None = None, visit: Mapping[str, Visit] | None = None) -> AuditReport:
    """Check the chosen streams (all by default, in the order given) and return every problem found."""
    report = AuditReport()
    expect = expect or {}
    names = streams if streams is not None else log.streams()
    seen_blobs: set[str] = set()
    own = not log.conn.in_transaction  # one read transaction (the caller's, if it holds one)
    if own:
        log.conn.execute("BEGIN")
    try:
        gone = collected_blobs(log) if blobs is not None else set()
        for name in names:
            rep = StreamReport(name)
            report.streams.append(rep)
            _audit_stream(log, blobs, name, rep, report, seen_blobs, gone, visit)
            if name in expect and expect[name] != rep.head:
                report.problems.append(Problem(
                    name, None, None, f"head hash {rep.head or '(empty)'} is not the expected {expect[name]}"))
        for name in sorted(set(expect) - set(names)):
            report.problems.append(Problem(name, None, None, "expected stream is not in the log"))
    finally:
        if own:
            log.conn.execute("COMMIT")
    report.blobs_checked = len(seen_blobs)
    return report


def collected_blobs(log: EventLog) -> set[str]:
    """Blobs that `rloopd gc` removed on purpose (recorded as `blobs.collected` in the home stream)."""
    gone: set[str] = set()
    for (text,) in log.conn.execute("SELECT data FROM events WHERE stream = 'home' AND type = 'blobs.collected'"):
        try:
            gone.update(x for x in json.loads(text).get("removed", []) if type(x) is str)
        except (ValueError, RecursionError, AttributeError, TypeError):
            continue  # a damaged event: the audit names it where it checks that event's payload
    return gone


def _audit_stream(log: EventLog, blobs: BlobStore | None, name: str, rep: StreamReport,
                  report: AuditReport, seen_blobs: set[str], gone: set[str],
                  visit: Mapping[str, Visit] | None) -> None:
    link, expected_n, last_seq = None, 0, 0
    payloads = _Payloads(name, report.problems)
    rows = log.conn.execute(
        "SELECT seq, n, type, v, at, data, prev, hash, id FROM events WHERE stream = ? ORDER BY n", (name,))
    seq = n = 0

    def bad(what: str) -> None:  # about the event being checked (made once, not once per event)
        report.problems.append(Problem(name, n, seq, what))

    for row in rows:
        seq, n, type_, v, at, text, prev, stored, _ = row
        rep.events += 1
        if n != expected_n:
            bad(f"position gap: expected n={expected_n} (an event is missing)")
        if seq < last_seq:
            bad("out of order: its seq is lower than the previous event's")
        parsed = True
        try:
            data = parse_json(text)
            canon = canonical_json(data)
        except ValueError as e:
            bad(f"data is not valid JSON: {e}")
            data, canon, parsed = None, text, False
        if canon != text:
            bad("data text is not in canonical form (its bytes were changed)")
        if link is None:  # first event: empty prev, or the parent's hash for a fork
            link = (_fork_prev(log, data) if type_ == "run.created" else None) or ""
        if prev != link:
            bad("prev does not match the hash of the event before it")
        if event_hash(prev, name, n, type_, v, at, canon) != stored:
            bad("hash does not match its contents")
        if parsed:  # JSON `null` too is checked (and refused) as a payload
            payloads.check(type_, v, data, seq, n)
            if blobs is not None:
                for ref in ev.blob_refs(data):
                    if ref in seen_blobs:
                        continue
                    seen_blobs.add(ref)
                    why = blobs.verify(ref)
                    if why and not (ref in gone and not blobs.exists(ref)):  # collected on purpose: not lost
                        bad(why)
        link, expected_n, last_seq = stored, n + 1, seq
        rep.head = stored
        if visit is not None and type_ in visit:
            visit[type_](name, row, data)
    payloads.flush()


class _Payloads:
    """Checks payloads against their models in batches, one pydantic call per type in a batch (a call per
    event would cost more than the rest of the audit), and puts each problem found where a check per event
    would have: at its place among the problems."""

    BATCH = 4096

    def __init__(self, stream: str, problems: list[Problem]):
        self.stream, self.problems = stream, problems
        self.pending: list[tuple[str, int, Any, int, int, int]] = []

    def check(self, type_: str, v: int, data: Any, seq: int, n: int) -> None:
        self.pending.append((type_, v, data, seq, n, len(self.problems)))
        if len(self.pending) >= self.BATCH:
            self.flush()

    def flush(self) -> None:
        groups: dict[tuple[str, int], list[int]] = {}
        for i, (type_, v, *_) in enumerate(self.pending):
            groups.setdefault((type_, v), []).append(i)
        found = []  # (its place, its order, the problem)
        for (type_, v), items in groups.items():
            current = ev.TYPES.get(type_, (None,))[0] == v  # else unknown, older (to upcast) or newer
            if current and ev.all_valid(type_, [self.pending[i][2] for i in items]):
                continue
            for i in items:
                _, _, data, seq, n, at = self.pending[i]
                try:
                    ev.decode(type_, v, data)
                except Exception as e:  # noqa: BLE001 - any decoding failure is an audit finding
                    found.append((at, i, Problem(self.stream, n, seq, str(e))))
        for at, _, problem in sorted(found, key=lambda f: f[:2], reverse=True):  # the latest first: the
            self.problems.insert(at, problem)  # earlier places stay where they are
        self.pending.clear()
