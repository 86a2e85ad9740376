"""Shared fixtures: temporary homes, a CLI runner that runs the real console script, sample payloads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rloopd.home import Home

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_tool(name: str) -> str:
    """The tool's path; skip without it on a laptop, but fail in CI, where .ci/run must install it."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed, but CI=true: .ci/run must install it")
        pytest.skip(f"{name} is not installed")
    return path


def need_module(name: str, extra: str):
    """The module `name`; skip without it on a laptop, but fail in CI, where the dev extra installs it
    (`extra`: the optional extra a user installs for it)."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{name} is not installed, but CI=true: the dev extra installs it")
        pytest.skip(f"{name} is not installed (pip install 'rloopd[{extra}]')")


def need_root() -> None:
    """Tests that switch to an unprivileged uid need root; skip on a laptop, fail in CI (which runs as root)."""
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("this test switches uids and needs root, but CI=true and it is not root")
        pytest.skip("needs root to switch to an unprivileged uid")
    need_tool("setpriv")


@pytest.fixture
def home_dir(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def home(home_dir: Path):
    h = Home.open(home_dir)
    yield h
    h.close()


def rloopd(*args: str, home: Path | None = None, check: bool = False, timeout: float = 120,
           env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    cmd = [sys.executable, "-m", "rloopd", *args]
    if home is not None:
        cmd += ["--home", str(home)]
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"rloopd {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


SHA = "0" * 64


def sample_payloads(blob: str = SHA) -> dict[str, dict]:
    """One valid payload for every event type in the catalogue."""
    return {
        "run.created": {"name": "r1", "lab": "/lab", "manifest": [
            {"path": "frozen/judge.py", "sha256": blob, "blob": blob, "role": "frozen"}],
            "config": {"budget": "steps:10"}, "agent": "random", "seed": 3, "program_blob": blob},
        "run.paused": {"by": "cli"},
        "run.resumed": {"by": "cli"},
        "run.stopped": {"by": "ctrl-c", "reason": "interrupted by the user"},
        "run.finished": {"reason": "experiments", "best": 2.5, "best_step": 3, "best_commit": "abc"},
        "run.warned": {"about": "program", "message": "program.md disappeared"},
        "run.archived": {"by": "cli"},
        "program.changed": {"program_blob": blob, "source": "live-edit"},
        "session.started": {"session": 1, "agent": "cmd:x", "program_blob": blob},
        "session.ended": {"session": 1, "exit_code": 0, "reason": "agent-exit", "usage": {"input": 10}},
        "agent.acted": {"session": 1, "kind": "command", "summary": "ls", "detail_blob": blob},
        "experiment.submitted": {"session": 1, "message": "deeper", "ticket": "t1"},
        "experiment.started": {"step": 1, "commit": "abc", "description": "LR 1e-3", "params": {"LR": 1e-05}},
        "experiment.finished": {"step": 1, "status": "ok", "metrics": {"val_bpb": 2.5, "test_bpb": 2.6},
                                "log_blob": blob, "wall_seconds": 1.5},
        "checkpoint.saved": {"step": 1, "blob": blob},
        "experiment.decided": {"step": 1, "accepted": True, "best_before": 3.0, "best_after": 2.5},
        "memory.written": {"path": "notes.md", "blob": blob, "session": 1},
        "integrity.violated": {"step": 1, "paths": ["frozen/judge.py"], "found": "modified"},
        "batch.created": {"question": "does it work?", "repeats": 2},
        "batch.run-added": {"run": "r1", "condition": "random"},
        "daemon.started": {"version": "0.1.0", "pid": 1},
        "daemon.stopped": {"reason": "SIGTERM"},
        "blobs.collected": {"removed": [], "rule": "keep best and last 3"},
        "run.imported": {"run": "r1", "archive": "r1.rloop", "sha256": SHA, "streams": {"r1": SHA}, "events": 4},
    }
