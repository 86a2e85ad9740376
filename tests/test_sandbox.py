"""The training sandbox: bubblewrap, all capabilities gone, the run's own uid, home and lab hidden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rloopd.sandbox import run_uid, training_sandbox

from .conftest import need_tool

PROBE = r"""
import json, os, socket
out = {"uid": os.getuid(), "cap": [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapBnd"))]}
def ls(p):
    try:
        return os.listdir(p)
    except FileNotFoundError:
        return None
out["home_visible"] = ls(HOME)
out["lab_visible"] = ls(LAB)
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1); out["net"] = "connected"
except OSError as e:
    out["net"] = e.errno
try:
    open("/etc/rloopd-sandbox-test", "w"); out["etc_write"] = True
except OSError:
    out["etc_write"] = False
open("written", "w").write("x")
out["pids"] = len([p for p in os.listdir("/proc") if p.isdigit()])
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch needs root")
def test_bwrap_sandbox_confines_training(tmp_path):
    need_tool("bwrap")
    home, lab = tmp_path / "home", tmp_path / "lab"
    for d in (home, lab):
        d.mkdir()
        (d / "secret.txt").write_text("hidden")
    scratch = home / "tmp" / "run-1"  # the run's scratch root lives in the hidden home
    scratch.mkdir(parents=True)
    base = Path(tempfile.mkdtemp(dir=scratch))
    base.chmod(0o777)
    sb = training_sandbox("run-1", hide=[home, lab], scratch=scratch, kind="bwrap")
    assert sb.kind == "bwrap" and sb.uid == run_uid("run-1")
    prefix = [w.replace("{base}", str(base)) for w in sb.prefix]
    code = PROBE.replace("HOME", repr(str(home))).replace("LAB", repr(str(lab)))
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["uid"] == sb.uid != 0
    assert out["cap"] == ["0000000000000000", "0000000000000000"]
    assert out["home_visible"] == ["tmp"] and out["lab_visible"] in (None, [])
    assert out["net"] != "connected" and out["etc_write"] is False
    assert out["pids"] <= 3, "its own pid namespace: no other process is visible"
    assert (base / "written").stat().st_uid == sb.uid


def test_setpriv_and_none_kinds():
    sb = training_sandbox("r", hide=[], kind="setpriv")
    if os.geteuid() == 0:
        assert sb.kind == "setpriv" and f"--reuid={sb.uid}" in sb.prefix
    else:
        assert sb.kind == "none" and sb.prefix == []
    assert training_sandbox("r", hide=[], kind="none").prefix == []
    assert len({run_uid(f"run-{i}") for i in range(50)}) > 40, "runs get different uids"
