"""Run one agent session: a process (group) in the run directory, its output captured and capped.

The session ends when the agent exits (`agent-exit`), when it outlives its timeout (`timeout`), when it
goes quiet for longer than `quiet_timeout` (`timeout` too: an agent that hangs without output), or when
the loop asks it to end (`window`, `paused`, `stopped`, or `daemon-restart` at shutdown): then the whole
process group gets SIGTERM and, after `grace` seconds, SIGKILL. A process that cannot be started (a
missing command) ends the session at once with reason `error` and says why. Output beyond `max_output`
bytes is counted but not kept (the first half and the last half of the cap are kept), so an agent that
floods its output cannot fill the disk; stdout and stderr are interleaved as they arrive. The partial line
at each edge of the cut goes too (at most `EDGE` bytes): output is redacted after it is capped, and a key
cut in two would leave halves that no pattern recognises.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STOP_REASONS = {"window": "window", "paused": "paused", "stopped": "stopped", "shutdown": "daemon-restart",
                "spend-cap": "spend-cap", "disk-cap": "disk-cap"}
MAX_LINE = 8 << 20  # a longer line of a JSON stream is handed on cut (and so recorded as unreadable)
EDGE = 4096  # the most dropped at each edge of a cut: a one-line secret shorter than this goes whole


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
    reap: Callable[[], None] | None = None  # ends what left the process group (setsid), e.g. by the run's uid
    stdin: Path | None = None  # a file given as standard input (the prompt, for the CLIs); else /dev/null
    on_line: Callable[[bytes], None] | None = None  # each line of stdout as it arrives (a JSON event stream)
    separate_stderr: bool = False  # keep stderr apart (SessionResult.errors), so stdout stays the stream


@dataclass
class SessionResult:
    reason: str  # agent-exit, timeout, window, paused, stopped, daemon-restart, error
    exit_code: int | None
    output: bytes
    output_bytes: int  # everything the agent printed, kept or not
    seconds: float
    detail: str = ""
    errors: bytes = b""  # stderr, when kept apart (capped like the output)

    @property
    def truncated(self) -> bool:
        return self.output_bytes > len(self.output)


class _Capture:
    """Keeps the head and the tail of a stream of bytes under a cap; counts everything."""

    def __init__(self, cap: int):
        self.cap, self.head, self.tail, self.total = cap, bytearray(), bytearray(), 0
        self.cut_at_newline = False  # the last byte dropped before the tail ended a line

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.cap // 2 - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            excess = len(self.tail) - self.cap // 2
            if excess > 0:
                self.cut_at_newline = self.tail[excess - 1] == ord("\n")
                del self.tail[:excess]

    def value(self) -> bytes:
        """Head and tail with the partial lines at the cut dropped, so that no fragment of a secret cut in
        two is left for the redactor to miss; where no newline is within `EDGE` bytes, `EDGE` bytes go."""
        if self.total <= len(self.head) + len(self.tail):
            return bytes(self.head + self.tail)
        head, tail = bytes(self.head), bytes(self.tail)
        end = head.rfind(b"\n", max(0, len(head) - EDGE))
        head = head[:end + 1] if end >= 0 else head[:max(0, len(head) - EDGE)]
        if not self.cut_at_newline:
            start = tail.find(b"\n", 0, EDGE)
            tail = tail[start + 1:] if start >= 0 else tail[EDGE:]
        skipped = self.total - len(head) - len(tail)
        return head + f"\n[rloopd: {skipped} bytes of output not kept]\n".encode() + tail


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
    # stdout and stderr are socket pairs, not pipes: a process of the agent can reopen a pipe through
    # /proc/<pid>/fd/1 and write into the stream rloopd parses, but a socket cannot be opened that way
    out_ours, out_theirs = socket.socketpair()
    err_ours, err_theirs = socket.socketpair() if spec.separate_stderr else (None, None)
    try:
        stdin = open(spec.stdin, "rb") if spec.stdin is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen([*spec.prefix, *spec.argv], cwd=spec.cwd, env=spec.env, stdin=stdin,
                                    stdout=out_theirs.fileno(),
                                    stderr=err_theirs.fileno() if err_theirs is not None else subprocess.STDOUT,
                                    start_new_session=True)
        finally:
            if stdin is not subprocess.DEVNULL:
                stdin.close()
            out_theirs.close()
            if err_theirs is not None:
                err_theirs.close()
    except OSError as e:
        out_ours.close()
        if err_ours is not None:
            err_ours.close()
        return SessionResult("error", None, b"", 0, time.monotonic() - t0,
                             f"cannot start {spec.argv[0]!r}: {e.strerror or e}")
    out_fd, out_cap, err_cap = out_ours.fileno(), _Capture(spec.max_output), _Capture(spec.max_output)
    streams = {out_fd: out_cap}
    if err_ours is not None:
        streams[err_ours.fileno()] = err_cap
    lines = _Lines(spec.on_line) if spec.on_line is not None else None
    sel = selectors.DefaultSelector()
    for fd in streams:
        sel.register(fd, selectors.EVENT_READ)
        os.set_blocking(fd, False)
    reason, detail, last_output, term_at, exited_at = None, "", t0, None, None
    try:
        open_pipes = set(streams)
        while open_pipes or proc.poll() is None:
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
            if open_pipes:
                for key, _ in sel.select(timeout=0.05):
                    try:
                        data = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        open_pipes.discard(key.fd)
                        sel.unregister(key.fd)
                        continue
                    streams[key.fd].add(data)
                    if lines is not None and key.fd == out_fd:
                        lines.add(data)
                    last_output = time.monotonic()
                if not open_pipes:
                    continue
                if proc.poll() is not None:
                    # The agent exited; processes it left behind hold the pipe open: end them (those that
                    # left the group too, through `reap`), read the rest; one that cannot be ended is
                    # abandoned after the grace period, so the session ends whatever it left running.
                    _signal_group(proc, signal.SIGKILL)
                    if exited_at is None and spec.reap is not None:
                        spec.reap()
                    exited_at = exited_at or now
                    if now - exited_at > max(spec.grace, 1.0):
                        open_pipes.clear()
                        detail = detail or "processes the agent left behind kept its output open; abandoned"
            else:
                time.sleep(0.05)
    finally:
        sel.close()
        _signal_group(proc, signal.SIGKILL)  # nothing of the session outlives it
        proc.wait()
        out_ours.close()
        if err_ours is not None:
            err_ours.close()
        if lines is not None:
            lines.close()  # a last line without its newline (a stream cut mid-line) is handed on as it is
    return SessionResult(reason or "agent-exit", proc.returncode, out_cap.value(), out_cap.total,
                         time.monotonic() - t0, detail, err_cap.value())


class _Lines:
    """Splits a byte stream into lines for a callback; a line longer than MAX_LINE is handed on cut."""

    def __init__(self, callback: Callable[[bytes], None]):
        self.callback, self.buffer = callback, bytearray()

    def add(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[:end + 1]
            self.callback(line)
        if len(self.buffer) > MAX_LINE:
            self.callback(bytes(self.buffer))
            self.buffer.clear()

    def close(self) -> None:
        if self.buffer:
            self.callback(bytes(self.buffer))
            self.buffer.clear()
