"""A run's socket and the `rloopd submit` / `rloopd result` clients an agent runs."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from rloopd.errors import DaemonError
from rloopd.runsocket import RunSocket, SubmitRefused, call

from .conftest import need_root

DONE = {"ticket": "t1", "step": 3, "status": "ok", "metric": "val_bpb", "value": 1.9, "accepted": True,
        "best": 1.9, "best_step": 3, "window_left": 600.0, "program_changed": True}


def client(sock, *args, env_extra=None, prefix=()):
    env = {k: v for k, v in os.environ.items() if k != "RLOOPD_SOCKET"}
    if sock is not None:
        env["RLOOPD_SOCKET"] = str(sock)
    env.update(env_extra or {})
    return subprocess.run([*prefix, sys.executable, "-m", "rloopd", *args], capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.fixture
def served(tmp_path):
    busy = threading.Lock()
    seen = []

    def submit(args):
        seen.append(args)
        if not busy.acquire(blocking=False):
            raise SubmitRefused("an experiment is already running for this run (step 3); wait for it")
        try:
            return {**DONE, "message": args["message"]} if args.get("wait") else {"ticket": "t1", "step": 3,
                                                                                 "pending": True}
        finally:
            busy.release()

    s = RunSocket(tmp_path / "run.sock", {"submit": submit, "result": lambda args: {**DONE, "asked": args}})
    yield s, seen
    s.close()


def test_submit_prints_the_result_and_exits_0(served):
    s, seen = served
    proc = client(s.path, "submit", "-m", "lower the learning rate")
    assert proc.returncode == 0, proc.stderr
    assert "step 3: ok, val_bpb 1.9; ACCEPTED" in proc.stdout and "best so far: val_bpb 1.9 (step 3)" in proc.stdout
    assert "10.0 minutes" in proc.stdout and "program.md changed" in proc.stdout
    assert seen[-1] == {"message": "lower the learning rate", "wait": True}
    ticket = client(s.path, "submit", "-m", "x", "--no-wait", "--json")
    assert json.loads(ticket.stdout) == {"ticket": "t1", "step": 3, "pending": True}
    result = json.loads(client(s.path, "result", "t1", "--json").stdout)
    assert result["asked"] == {"ticket": "t1"} and result["value"] == 1.9


def test_refusals_and_bad_use_are_one_line(served, tmp_path):
    s, _ = served
    outside = client(None, "submit", "-m", "x")
    assert outside.returncode == 2 and "RLOOPD_SOCKET is not set" in outside.stderr
    assert client(s.path, "submit", "-m", "  ").returncode == 2
    with pytest.raises(DaemonError, match="takes result, submit, not 'stop'") as e:
        call(s.path, "stop", {})
    assert e.value.exit_code == 2
    gone = client(tmp_path / "nothing.sock", "submit", "-m", "x")
    assert gone.returncode == 2 and "did not answer" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1


def test_only_the_runs_uid_may_connect():
    need_root()
    uid = 61000
    where = Path(tempfile.mkdtemp(prefix="rloopd-sock-"))  # traversable by every uid (pytest's tmp is not)
    where.chmod(0o755)
    s = RunSocket(where / "run.sock", {"submit": lambda a: DONE}, uid=uid)
    try:
        st = os.stat(s.path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == uid
        as_owner = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        as_other = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        assert client(s.path, "submit", "-m", "x", prefix=as_owner).returncode == 0
        other = client(s.path, "submit", "-m", "x", prefix=as_other)
        assert other.returncode == 2 and "Permission denied" in other.stderr
    finally:
        s.close()
        shutil.rmtree(where)
