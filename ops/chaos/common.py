"""What the fault campaigns share: a clean temporary home, a lab whose experiments return at once, a daemon
started and killed as a process tree, and the checks that run with the daemon stopped.

The campaigns use the repository's own `tests/labs/instant` lab (an experiment takes SLEEP seconds and
trains nothing), so a campaign spends its time on restarts and checks, not on training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTANT = ROOT / "tests" / "labs" / "instant"
RLOOPD = [sys.executable, "-m", "rloopd"]


def temp_home(prefix: str) -> Path:
    """A fresh directory holding the campaign's home, labs and logs; removed by the caller."""
    return Path(tempfile.mkdtemp(prefix=f"rloopd-chaos-{prefix}-"))


def make_lab(dest: Path, **constants) -> Path:
    """A copy of the instant lab with train.py constants set (SLEEP: seconds per experiment)."""
    from rloopd.lab import set_constants

    shutil.copytree(INSTANT, dest)
    train = dest / "workspace" / "train.py"
    train.write_text(set_constants(train.read_text(), constants))
    return dest


def cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*RLOOPD, *args, "--home", str(home)], capture_output=True, text=True, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (experiments and sessions run in their own sessions, so a process group
    does not reach them; systemd's control group would)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Daemon:
    """`rloopd serve` on a home, in its own session; killed as a tree, like a control group."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None):
        self.home, self.args, self.env = home, args, env or {}
        self.proc: subprocess.Popen | None = None
        self.log = open(home.parent / "daemon.log", "a")

    def start(self, timeout: float = 60) -> float:
        """Start and wait until it answers; returns the seconds that took (recovery happens before READY)."""
        from rloopd import control
        from rloopd.errors import DaemonError

        t0 = time.monotonic()
        self.proc = subprocess.Popen([*RLOOPD, "serve", "--home", str(self.home), *self.args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                     start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited {self.proc.returncode} (see {self.log.name})")
            try:
                if control.call(self.home, "ping", timeout=2)["pid"] == self.proc.pid:
                    return time.monotonic() - t0
            except DaemonError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"the daemon did not answer within {timeout} s (see {self.log.name})")

    def kill(self) -> None:
        """SIGKILL the daemon and everything it started, at once."""
        tree = descendants(self.proc.pid)
        for pid in [self.proc.pid, *tree]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)

    def term(self, timeout: float = 60) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("the daemon did not stop within 60 s of SIGTERM") from None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        self.log.close()


def check_home(home: Path) -> list[str]:
    """With the daemon stopped: audit of every stream, replay of every run, and the crash invariants
    (rloopd.invariants); in this process, as `rloopd audit` and `rloopd replay` do them."""
    from rloopd.audit import audit
    from rloopd.home import Home
    from rloopd.invariants import check_run
    from rloopd.replay import replay

    problems = []
    with Home.open(home, create=False) as h:
        report = audit(h.log, h.blobs)
        problems += [f"audit: {p}" for p in report.problems]
        for run in [e.stream for e in h.log.runs()]:
            rep = replay(h, run)
            problems += [f"replay {run}: {d['kind']}: {d['what']}" for d in rep.divergences]
            problems += check_run(h, run)
    return problems


def emit(figures: dict) -> None:
    """The campaign's one JSON line."""
    print(json.dumps(figures), flush=True)
