"""ops/rloopd.service: systemd accepts it, and it asks for what the daemon relies on."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import need_tool

UNIT = Path(__file__).resolve().parents[1] / "ops" / "rloopd.service"


def test_systemd_analyze_verify_passes(tmp_path):
    analyze = need_tool("systemd-analyze")
    exe = shutil.which("rloopd", path=str(Path(sys.executable).parent))
    unit = tmp_path / "rloopd.service"  # the installed path of the console script differs per machine
    unit.write_text(UNIT.read_text().replace("/opt/rloopd/.venv/bin/rloopd", exe))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_unit_settings():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=rloopd", "KillMode=mixed",
                 "User=rloopd", "Group=rloopd", "EnvironmentFile=", "ExecStart=/opt/rloopd/.venv/bin/rloopd serve"):
        assert line in text, line
    assert "PrivateDevices=yes" not in text, "the GPUs must stay visible"
