"""Run state as a pure fold over a run's events: `apply(state, event) -> state`, no I/O."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from rloopd.log import Event

TERMINAL = {"finished", "stopped", "failed", "archived"}


@dataclass(frozen=True)
class Attempt:
    step: int
    replica: int
    attempt: int
    commit: str


@dataclass(frozen=True)
class RunState:
    run: str = ""
    name: str = ""
    status: str = "new"  # running, paused, stopped, finished, failed, archived
    created: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_bpb"
    direction: str = "minimize"
    step: int = -1  # last step started
    best: float | None = None
    best_step: int | None = None
    best_commit: str | None = None
    base_commit: str = ""
    experiments: int = 0  # steps >= 1 with a finish that is not interrupted
    valid: int = 0
    accepted: int = 0  # accepted experiments (steps >= 1)
    sessions: int = 0
    restarts: int = 0
    last_end_reason: str | None = None
    open_session: int | None = None  # a session started and not yet ended
    program_blob: str | None = None
    program_path: str | None = None  # the file a live run follows (the lab's program.md, or one given later)
    in_flight: Attempt | None = None
    flight_started_at: str | None = None
    active_seconds: float = 0.0  # the window clock: time in sessions, and in experiments outside them
    session_started_at: str | None = None
    session_waited: float = 0.0  # seconds of the open session spent waiting for a slot (off the clock)
    waiting_since: str | None = None  # a submit of the open session waits for a slot since then
    spent_tokens: int = 0  # the run's own sessions (a fork starts again at 0): input + output tokens
    spent_usd: float = 0.0  # ... and dollars, where the agent reports a cost
    retry: Attempt | None = None  # an interrupted attempt, to be started again as the next attempt
    last_status: str | None = None
    checkpoint_blob: str | None = None
    position: int = -1  # n of the last event folded


_FIELDS = frozenset(f.name for f in fields(RunState))


def _replace(state: RunState, **changes: Any) -> RunState:
    """`dataclasses.replace` at a tenth of its cost (the fold makes two per event it applies): a new
    instance with a copy of the old one's fields and the changes, which must name fields."""
    if not changes.keys() <= _FIELDS:
        raise TypeError(f"RunState has no field {', '.join(sorted(changes.keys() - _FIELDS))}")
    new = object.__new__(RunState)
    new.__dict__.update(state.__dict__, **changes)
    return new


def apply(state: RunState, e: Event) -> RunState:
    """Fold one event into the state (unknown types only move the position)."""
    d, s = e.data, _replace(state, position=e.n)
    t = e.type
    if t == "run.created" and d.get("parent"):  # a fork: everything its parent's prefix built carries on
        return _replace(s, run=e.stream, name=d["name"], status="running", created=d, in_flight=None,
                        retry=None, flight_started_at=None, open_session=None, session_started_at=None,
                        session_waited=0.0, waiting_since=None, spent_tokens=0, spent_usd=0.0,
                        base_commit=d.get("base_commit", ""),
                        program_blob=d.get("program_blob") or s.program_blob,
                        program_path=d.get("program_path") or
                        str(Path(d["lab"]) / d.get("config", {}).get("program", "program.md")))
    if t == "run.created":
        return _replace(s, run=e.stream, name=d["name"], status="running", created=d,
                        metric=d.get("metric", "val_bpb"), direction=d.get("direction", "minimize"),
                        base_commit=d.get("base_commit", ""), best_commit=d.get("base_commit") or None,
                        program_blob=d.get("program_blob"),
                        program_path=d.get("program_path") or
                        str(Path(d["lab"]) / d.get("config", {}).get("program", "program.md")))
    if t == "experiment.submitted":  # in a session: the clock stops until the experiment has its slot
        return _replace(s, waiting_since=e.at) if s.open_session is not None else s
    if t == "experiment.started":
        waited = _seconds(s.waiting_since, e.at)
        return _replace(s, step=max(s.step, d["step"]), retry=None, flight_started_at=e.at,
                        waiting_since=None, session_waited=s.session_waited + waited,
                        in_flight=Attempt(d["step"], d.get("replica", 0), d.get("attempt", 0), d["commit"]))
    if t == "experiment.finished":
        counted = d["step"] >= 1 and d.get("replica", 0) == 0 and d["status"] != "interrupted"
        retry = None
        if d["status"] == "interrupted":
            commit = s.in_flight.commit if s.in_flight is not None else ""
            retry = Attempt(d["step"], d.get("replica", 0), d.get("attempt", 0) + 1, commit)
        spent = _seconds(s.flight_started_at, e.at)
        if s.open_session is not None:
            spent = 0.0  # inside a session: the session's own time counts, once
        return _replace(s, in_flight=None, last_status=d["status"], retry=retry, flight_started_at=None,
                        active_seconds=s.active_seconds + max(spent, 0.0),
                        experiments=s.experiments + counted, valid=s.valid + (counted and d["status"] == "ok"))
    if t == "checkpoint.saved":
        return _replace(s, checkpoint_blob=d["blob"])
    if t == "experiment.decided":
        if not d["accepted"]:
            return s
        return _replace(s, best=d["best_after"], best_step=d["step"], best_commit=d.get("best_commit") or s.best_commit,
                        accepted=s.accepted + (d["step"] >= 1))
    if t == "program.changed":
        return _replace(s, program_blob=d["program_blob"], program_path=d.get("path") or s.program_path)
    if t == "session.started":  # a restart: a session opened because the agent ended the one before
        return _replace(s, sessions=s.sessions + 1, restarts=s.restarts + (s.last_end_reason == "agent-exit"),
                        open_session=d["session"], session_started_at=e.at, session_waited=0.0,
                        waiting_since=None)
    if t == "session.ended":
        spent = _seconds(s.session_started_at, e.at) - s.session_waited - _seconds(s.waiting_since, e.at)
        usage = d.get("usage") or {}
        return _replace(s, last_end_reason=d["reason"], open_session=None, session_started_at=None,
                        session_waited=0.0, waiting_since=None, active_seconds=s.active_seconds + max(spent, 0.0),
                        spent_tokens=s.spent_tokens + usage.get("input", 0) + usage.get("output", 0),
                        spent_usd=s.spent_usd + (d.get("cost_usd") or 0.0))
    if t in ("run.paused", "run.resumed", "run.stopped", "run.finished", "run.archived"):
        status = {"run.paused": "paused", "run.resumed": "running", "run.stopped": "stopped",
                  "run.finished": "finished", "run.archived": "archived"}[t]
        if t == "run.finished" and d.get("reason") == "failed":
            status = "failed"
        return _replace(s, status=status)
    return s


def _seconds(since: str | None, until: str) -> float:
    """Seconds from `since` to `until` (both event times), 0 without a start."""
    return max((parse_at(until) - parse_at(since)).total_seconds(), 0.0) if since else 0.0


def parse_at(at: str) -> datetime:
    """An event's `at` (UTC, ISO 8601 with `Z`) as an aware datetime."""
    return datetime.fromisoformat(at.replace("Z", "+00:00"))


# The types `apply` reacts to; any other event only moves the position (a test holds it to that).
FOLDED_TYPES = frozenset({
    "run.created", "experiment.submitted", "experiment.started", "experiment.finished", "checkpoint.saved", "experiment.decided",
    "program.changed", "session.started", "session.ended", "run.paused", "run.resumed", "run.stopped",
    "run.finished", "run.archived"})


def fold(events: Iterable[Event], state: RunState | None = None) -> RunState:
    """`apply` over `events`. Events of other types are only counted into the position, without a copy of
    the state each: most of a long run's events are `agent.acted`, and a fold must stay cheap per event."""
    state = state or RunState()
    last = None
    for e in events:
        last = e
        if e.type in FOLDED_TYPES:
            state = apply(state, e)
    if last is not None and state.position != last.n:
        state = _replace(state, position=last.n)
    return state
