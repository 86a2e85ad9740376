"""One agent session as a real process group: exit, timeout, silence, stop requests, floods, leftovers."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from rloopd.redact import Redactor
from rloopd.session import EDGE, SessionSpec, run_session


def spec(tmp_path, script: str, **kw) -> SessionSpec:
    return SessionSpec(["/bin/sh", "-c", script], tmp_path, {"PATH": os.environ["PATH"]}, **kw)


def test_an_agent_that_exits_is_recorded_with_its_code_and_output(tmp_path):
    r = run_session(spec(tmp_path, "echo thinking; echo oops >&2; exit 3"))
    assert (r.reason, r.exit_code) == ("agent-exit", 3)
    assert r.output == b"thinking\noops\n" and not r.truncated


def test_a_missing_command_is_an_error_with_a_reason(tmp_path):
    r = run_session(SessionSpec(["/no/such/agent"], tmp_path, {}))
    assert r.reason == "error" and r.exit_code is None and "/no/such/agent" in r.detail


def test_a_session_past_its_timeout_is_terminated_then_killed(tmp_path):
    t0 = time.monotonic()
    r = run_session(spec(tmp_path, "trap '' TERM; echo start; while :; do sleep 0.1; done", timeout=0.5, grace=0.5))
    assert r.reason == "timeout" and "timeout of 0.5 s" in r.detail and r.exit_code == -9
    assert r.output == b"start\n" and time.monotonic() - t0 < 5


def test_a_silent_agent_is_ended(tmp_path):
    r = run_session(spec(tmp_path, "echo hello; sleep 30", quiet_timeout=0.5, grace=1))
    assert r.reason == "timeout" and "no output for 0.5 s" in r.detail and r.seconds < 5


def test_a_stop_request_ends_the_session_with_its_reason(tmp_path):
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    r = run_session(spec(tmp_path, "echo working; sleep 30"), stop=stop, stop_reason=lambda: "window")
    assert r.reason == "window" and r.exit_code == -15 and r.seconds < 5
    stop = threading.Event()
    stop.set()
    assert run_session(spec(tmp_path, "sleep 30"), stop=stop, stop_reason=lambda: "shutdown").reason == "daemon-restart"


def test_a_flood_is_counted_but_not_kept(tmp_path):
    r = run_session(spec(tmp_path, "head -c 20000000 /dev/zero | tr '\\0' x", max_output=1 << 20))
    assert r.reason == "agent-exit" and r.output_bytes == 20_000_000 and r.truncated
    assert len(r.output) < (1 << 20) + 100 and b"bytes of output not kept" in r.output


KEY = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wZy4zQ7"
PEM_BODY = ["MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo", "4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onL",
            "Rnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKf"]
PEM = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(PEM_BODY) + "\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize("filler, secret", [("lines", KEY), ("one-line", KEY), ("lines", PEM)])
def test_a_secret_cut_by_the_cap_leaves_no_fragment(tmp_path, filler, secret):
    """Output is redacted after it is capped (sessions.py): a key that straddles either edge of the cut must
    go whole, or its halves would pass the redactor. One planted across each edge of a real flood."""
    cap, half = 1 << 16, 1 << 15

    def fill(n: int) -> bytes:
        return ((b"x" * 99 + b"\n") * (n // 100 + 1))[:n] if filler == "lines" else b"." * n
    planted = f" key={secret} ".encode()
    data = fill(half - 20) + planted + fill(3_000_000) + planted + fill(half + 20 - len(planted))
    (tmp_path / "flood").write_bytes(data)
    r = run_session(spec(tmp_path, "cat flood", max_output=cap))
    assert r.reason == "agent-exit" and r.output_bytes == len(data) and r.truncated

    mark = re.search(rb"\n\[rloopd: (\d+) bytes of output not kept\]\n", r.output)
    head, tail = r.output[:mark.start()], r.output[mark.end():]
    assert data.startswith(head) and data.endswith(tail)
    assert len(head) + int(mark.group(1)) + len(tail) == len(data)  # the mark says what was cut, exactly
    if filler == "lines":  # the partial line at each edge goes, no more
        assert head == data[:data.rindex(b"\n", 0, half) + 1]
        assert tail == data[data.index(b"\n", len(data) - half) + 1:]
    else:  # no newline near the edges: EDGE bytes each side
        assert len(head) == len(tail) == half - EDGE

    kept = r.output if secret == KEY else Redactor().redact(r.output)  # a PEM key's lines go by the redactor
    fragments = {part[i:i + 8] for part in secret.split("\n") for i in range(len(part) - 7)}
    assert not any(f.encode() in kept for f in fragments if f.strip("x.- "))


def test_a_cut_that_falls_between_lines_drops_nothing_more(tmp_path):
    data = b"".join(b"%09d\n" % i for i in range(10_000))
    (tmp_path / "flood").write_bytes(data)
    r = run_session(spec(tmp_path, "cat flood", max_output=1000))
    assert r.output == data[:500] + b"\n[rloopd: 99000 bytes of output not kept]\n" + data[-500:]


def test_children_left_behind_do_not_outlive_the_session(tmp_path):
    pid_file = tmp_path / "child.pid"
    r = run_session(spec(tmp_path, f"sleep 60 & echo $! > {pid_file}; echo bye"))
    assert r.reason == "agent-exit" and r.output == b"bye\n" and r.seconds < 5
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_a_process_of_the_agent_cannot_reopen_the_stream_through_proc(tmp_path):
    """The CLI's stdout is what rloopd parses; a command the agent runs must not be able to write into it
    by opening /proc/<the CLI's pid>/fd/1 (possible with a pipe, refused for a socket)."""
    lines = []
    script = 'echo real; sh -c \'echo forged > /proc/$PPID/fd/1\' 2>/dev/null; echo "status $?"'
    result = run_session(SessionSpec(["sh", "-c", script], tmp_path, dict(os.environ), on_line=lines.append,
                                     separate_stderr=True))
    assert lines == [b"real", b"status 2"] and b"forged" not in result.output
