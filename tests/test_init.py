"""rloopd init: a new lab from the reference one, from a checkout and from an installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rloopd.lab import load_lab

from .conftest import rloopd

ROOT = Path(__file__).resolve().parents[1]


def test_init_from_checkout(tmp_path):
    proc = rloopd("init", str(tmp_path / "lab"))
    assert proc.returncode == 0, proc.stderr
    lab = load_lab(tmp_path / "lab")
    assert lab.name and (tmp_path / "lab" / "frozen" / "private").is_dir()
    assert not list((tmp_path / "lab").rglob("__pycache__"))
    again = rloopd("init", str(tmp_path / "lab"))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_init_from_an_installed_wheel(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    site = tmp_path / "site"  # --target, unlike --prefix, leaves the developer's editable install alone
    [wheel] = wheels.glob("rloopd-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = "import rloopd, sys; print(rloopd.__file__); from rloopd.cli import main; sys.argv=['rloopd','init',sys.argv[1]]; main()"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "newlab")], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(str(site)), "the wheel's copy of rloopd ran, not the checkout"
    assert (tmp_path / "newlab" / "rloop.toml").read_text() == (ROOT / "rloop.toml").read_text()
    assert load_lab(tmp_path / "newlab").params
