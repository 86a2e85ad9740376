"""Run the lab's real entry point in a subprocess, as the runner would, and read back its result JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rloopd.lab import set_constants

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent
ENTRY = ROOT / "frozen" / "experiment.py"
SMALL_SOURCE = "synthetic:64K"   # small splits keep each experiment to a few seconds
EVAL_BYTES = "8192"
TINY = {"DEPTH": 1, "WIDTH": 32, "N_HEAD": 2, "MLP_RATIO": 2, "CONTEXT": 32, "BATCH_SIZE": 8, "WARMUP": 2}


def tiny_train_py() -> str:
    """The reference train.py with tiny constants: the same code path, a fraction of the time."""
    return set_constants((ROOT / "workspace" / "train.py").read_text(), TINY)


def workspace(tmp: Path, train_py: str, name: str = "workspace") -> Path:
    ws = tmp / name
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "train.py").write_text(train_py)
    return ws


def fixture(name: str, **subst: str) -> str:
    text = (FIXTURES / name).read_text()
    for key, value in subst.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def run(ws: Path, tmp: Path, cache: Path, *extra: str, budget: str = "steps:3", timeout: float = 60,
        seed: int = 0, source: str = SMALL_SOURCE, secrets: dict | None = None, secrets_via: str = "file",
        env: dict | None = None, wall: float = 300) -> tuple[dict | None, str, subprocess.CompletedProcess]:
    """One experiment; returns (result or None, the children's log, the judge's process)."""
    result, log = tmp / "out" / "result.json", tmp / "out" / "train.log"
    result.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ENTRY), "--workspace", str(ws), "--result", str(result), "--budget", budget,
           "--timeout", str(timeout), "--seed", str(seed), "--source", source, "--eval-bytes", EVAL_BYTES,
           "--cache", str(cache), "--log", str(log), "--device", "cpu", *extra]
    pass_fds: tuple[int, ...] = ()
    if secrets is not None and secrets_via == "file":
        path = tmp / "home" / "secrets.json"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_text(json.dumps(secrets))
        path.chmod(0o600)
        cmd += ["--secrets-file", str(path)]
    elif secrets is not None:
        r, w = os.pipe()
        os.write(w, json.dumps(secrets).encode())
        os.close(w)
        cmd += ["--secrets-fd", str(r)]
        pass_fds = (r,)
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=wall, pass_fds=pass_fds, env=full_env,
                          cwd=tmp)
    for fd in pass_fds:
        os.close(fd)
    data = json.loads(result.read_text()) if result.exists() else None
    return data, (log.read_text(errors="replace") if log.exists() else ""), proc
