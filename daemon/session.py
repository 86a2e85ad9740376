"""Run one agent session: a process (group) in the run directory, its output captured and capped.

The session ends when the agent exits (`agent-exit`), when it outlives its timeout (`timeout`), when it
goes quiet for longer than `quiet_timeout` (`timeout` too: an agent that hangs without output), or when
the loop asks it to end (`window`, `paused`, `stopped`, or `daemon-restart` at shutdown): then the whole
process group gets SIGTERM and, after `grace` seconds, SIGKILL. A process that cannot be started (a
missing command) ends the session at once with reason `error` and says why. Output beyond `max_output`
bytes is counted but not kept (the first half and the last half of the cap are kept), so an agent that
floods its output cannot fill the disk; stdout and stderr are interleaved as they arrive.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STOP_REASONS = {"window": "window", "paused": "paused", "stopped": "stopped", "shutdown": "daemon-restart"}


@dataclass
class SessionSpec:
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    timeout: float = 3600.0
    quiet_timeout: float | None = None
    grace: float = 10.0
    max_output: int = 16 << 20
    prefix: tuple[str, ...] = ()  # the sandbox command the agent runs under
    waiting: Callable[[], bool] | None = None  # True while the agent waits on the daemon (its clocks pause)


@dataclass
class SessionResult:
    reason: str  # agent-exit, timeout, window, paused, stopped, daemon-restart, error
    exit_code: int | None
    output: bytes
    output_bytes: int  # everything the agent printed, kept or not
    seconds: float
    detail: str = ""

    @property
    def truncated(self) -> bool:
        return self.output_bytes > len(self.output)


class _Capture:
    """Keeps the head and the tail of a stream of bytes under a cap; counts everything."""

    def __init__(self, cap: int):
        self.cap, self.head, self.tail, self.total = cap, bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap // 2 - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            del self.tail[: max(0, len(self.tail) - self.cap // 2)]

    def value(self) -> bytes:
        if self.total <= len(self.head) + len(self.tail):
            return bytes(self.head + self.tail)
        skipped = self.total - len(self.head) - len(self.tail)
        return bytes(self.head) + f"\n[rloopd: {skipped} bytes of output not kept]\n".encode() + bytes(self.tail)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (through /proc's children lists), nearest first."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += kids
            todo += kids
    return found


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM to the agent's own processes. bubblewrap dies on SIGTERM and takes everything with it at
    once, so its processes are passed over and the agent gets its grace period; without a sandbox the
    whole group gets it."""
    targets = []
    for pid in _descendants(proc.pid):
        try:
            if Path(f"/proc/{pid}/exe").resolve().name != "bwrap":
                targets.append(pid)
        except OSError:
            continue
    if not targets or Path(f"/proc/{proc.pid}/exe").resolve().name != "bwrap":
        _signal_group(proc, signal.SIGTERM)
        return
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_session(spec: SessionSpec, stop: threading.Event | None = None,
                stop_reason: Callable[[], str] | None = None) -> SessionResult:
    """Run the session to its end (see the module docstring); never raises for the agent's failures."""
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen([*spec.prefix, *spec.argv], cwd=spec.cwd, env=spec.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return SessionResult("error", None, b"", 0, time.monotonic() - t0,
                             f"cannot start {spec.argv[0]!r}: {e.strerror or e}")
    capture = _Capture(spec.max_output)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    os.set_blocking(proc.stdout.fileno(), False)
    reason, detail, last_output, term_at = None, "", t0, None
    try:
        open_pipe = True
        while open_pipe or proc.poll() is None:
            now = time.monotonic()
            if spec.waiting is not None and spec.waiting():
                last_output = now  # waiting for an experiment is not silence
            if reason is None:
                if stop is not None and stop.is_set():
                    reason = STOP_REASONS.get(stop_reason() if stop_reason else "stopped", "stopped")
                elif now - t0 > spec.timeout:
                    reason, detail = "timeout", f"the session passed its timeout of {spec.timeout:g} s"
                elif spec.quiet_timeout is not None and now - last_output > spec.quiet_timeout:
                    reason, detail = "timeout", f"no output for {spec.quiet_timeout:g} s"
                if reason is not None:
                    _terminate(proc)
                    term_at = now
            elif term_at is not None and now - term_at > spec.grace and proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                term_at = None
            if open_pipe:
                for _ in sel.select(timeout=0.05):
                    try:
                        data = proc.stdout.read(1 << 16)
                    except BlockingIOError:
                        continue
                    if not data:
                        open_pipe = False
                        sel.unregister(proc.stdout)
                        break
                    capture.add(data)
                    last_output = time.monotonic()
                if not open_pipe:
                    continue
                if proc.poll() is not None and reason is None:
                    # The agent exited; children it left behind hold the pipe open: end them, read the rest.
                    _signal_group(proc, signal.SIGKILL)
            else:
                time.sleep(0.05)
    finally:
        sel.close()
        _signal_group(proc, signal.SIGKILL)  # nothing of the session outlives it
        proc.wait()
        proc.stdout.close()
    code = proc.returncode
    return SessionResult(reason or "agent-exit", code, capture.value(), capture.total, time.monotonic() - t0, detail)
