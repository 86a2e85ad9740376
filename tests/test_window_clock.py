"""The window clock (DESIGN section 5): active time in sessions and experiments, not pauses or slot waits."""

from __future__ import annotations

from rloopd.log import Event
from rloopd.memory.state import fold


def at(seconds: int) -> str:
    return f"2026-01-01T00:{seconds // 60:02d}:{seconds % 60:02d}.000000Z"


def events(*rows):
    return [Event(i, f"id{i}", "r", i, t, 1, at(sec), data, "", "") for i, (sec, t, data) in enumerate(rows)]


CREATED = (0, "run.created", {"name": "r", "lab": "/lab", "base_commit": "c0"})


def test_a_sessions_wait_for_a_slot_is_off_the_clock():
    state = fold(events(
        CREATED,
        (0, "session.started", {"session": 1}),
        (10, "experiment.submitted", {"session": 1, "step": 1}),
        (40, "experiment.started", {"step": 1, "commit": "c1"}),  # 30 s waiting for a slot
        (50, "experiment.finished", {"step": 1, "status": "ok"}),
        (55, "experiment.submitted", {"session": 1, "step": 2}),
        (65, "session.ended", {"session": 1, "reason": "stopped"}),  # ended while still waiting: 10 s more
    ))
    assert state.active_seconds == 65 - 30 - 10
    assert state.session_waited == 0 and state.waiting_since is None


def test_experiments_outside_sessions_count_from_their_start():
    state = fold(events(
        CREATED,
        (5, "experiment.started", {"step": 0, "commit": "c0"}),
        (17, "experiment.finished", {"step": 0, "status": "ok"}),
        (30, "experiment.submitted", {"session": 0, "step": 1}),  # outside a session: no wait recorded
        (40, "experiment.started", {"step": 1, "commit": "c1"}),
        (52, "experiment.finished", {"step": 1, "status": "ok"}),
    ))
    assert state.active_seconds == 24 and state.waiting_since is None
