"""The training sandbox: bubblewrap, all capabilities gone, the run's own uid, home and lab hidden."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rloopd.sandbox import SandboxError, allocate_uid, resolve_kind, training_sandbox

from .conftest import need_root, need_tool

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


def test_bwrap_sandbox_confines_training(tmp_path):
    need_root()
    need_tool("bwrap")
    home, lab = tmp_path / "home", tmp_path / "lab"
    for d in (home, lab):
        d.mkdir()
        (d / "secret.txt").write_text("hidden")
    scratch = home / "tmp" / "run-1"  # the run's scratch root lives in the hidden home
    scratch.mkdir(parents=True)
    base = Path(tempfile.mkdtemp(dir=scratch))
    base.chmod(0o777)
    sb = training_sandbox(61007, hide=[home, lab], scratch=scratch, kind="bwrap")
    assert sb.kind == "bwrap" and sb.uid == 61007
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
    if os.geteuid() == 0:
        sb = training_sandbox(61001, hide=[], kind="setpriv")
        assert sb.kind == "setpriv" and "--reuid=61001" in sb.prefix
    assert training_sandbox(61001, hide=[], kind="none").prefix == []
    with pytest.raises(SandboxError, match="--sandbox 'bogus'"):
        resolve_kind("bogus")


def test_uids_are_allocated_one_per_run():
    taken: set[int] = set()
    for _ in range(50):
        taken.add(allocate_uid(taken, (100, 149)))
    assert taken == set(range(100, 150))
    with pytest.raises(SandboxError, match="every uid"):
        allocate_uid(taken, (100, 149))
