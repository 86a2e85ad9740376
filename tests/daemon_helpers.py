"""Start a real `rloopd serve` process on a temporary home and drive it through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rloopd import control
from rloopd.errors import DaemonError
from rloopd.history import run_state
from rloopd.home import Home
from rloopd.memory.state import RunState

from .conftest import rloopd

INSTANT = Path(__file__).parent / "labs" / "instant"


def make_lab(tmp: Path, name: str = "lab", **constants) -> Path:
    """A copy of the instant lab with train.py constants set (e.g. SLEEP=0.3)."""
    from rloopd.lab import set_constants

    dest = tmp / name
    shutil.copytree(INSTANT, dest)
    train = dest / "workspace" / "train.py"
    train.write_text(set_constants(train.read_text(), constants))
    return dest


class Served:
    def __init__(self, home: Path, *args: str, env: dict | None = None):
        self.home, self.args, self.env = home, args, env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Served:
        self.log = open(self.home.parent / f"daemon-{time.monotonic_ns()}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "rloopd", "serve", "--home", str(self.home), *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited {self.proc.returncode}: {self.output()}")
            try:  # a socket file may be a dead daemon's: only an answer counts
                if control.call(self.home, "ping", timeout=2)["pid"] == self.proc.pid:
                    return
            except DaemonError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the daemon did not get ready: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def term(self) -> float:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        return time.monotonic() - t0

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.term()
        self.log.close()


def cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return rloopd(*args, home=home, check=check)


def detach(home: Path, lab: Path, *args: str) -> str:
    return json.loads(cli(home, "run", "--lab", str(lab), "--detach", "--json", *args).stdout)["run_id"]


def state(home: Path, run: str) -> RunState:
    with Home.open(home, create=False) as h:
        return run_state(h.log, run)


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def events(home: Path, run: str, *types: str) -> list[dict]:
    with Home.open(home, create=False) as h:
        return [e.as_dict() for e in h.log.read(run, types=types)]
