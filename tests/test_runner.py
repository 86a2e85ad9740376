"""The runner: the judge's files stay out of the children's sight; process groups die; results are read, not trusted."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from rloopd.runner import Experiment, Interrupted, run_experiment
from rloopd.sandbox import training_sandbox

from .conftest import need_root, need_tool

# A stand-in judge: makes {base} under --scratch, starts one child through the sandbox prefix, and
# reports what the child could see of the judge's private paths (its log, result and model paths).
JUDGE = r'''
import argparse, json, os, shlex, subprocess, sys, tempfile
p = argparse.ArgumentParser()
for a in ("--workspace", "--result", "--budget", "--timeout", "--seed", "--secrets-fd", "--sandbox", "--cache",
          "--scratch", "--log", "--save-model", "--source"):
    p.add_argument(a)
a = p.parse_args()
base = tempfile.mkdtemp(dir=a.scratch); os.chmod(base, 0o777)
open(a.log, "w").write("judge log: the children must not read this\n")
probe = "import os, sys, json; r = {}\n" \
        "for path in sys.argv[1:]:\n" \
        "    try: open(path).read(); r[path] = 'read'\n" \
        "    except OSError as e: r[path] = type(e).__name__\n" \
        "print(json.dumps(r))"
prefix = [w.replace("{base}", base) for w in shlex.split(a.sandbox)]
out = subprocess.run([*prefix, sys.executable, "-c", probe, a.log, a.result + ".planted", os.path.join(base, "..", "x")],
                     capture_output=True, text=True)
try:
    seen = json.loads(out.stdout)
except ValueError:
    seen = {"error": out.stderr[-500:]}
json.dump({"status": "ok", "val_bpb": 1.5, "seen": seen}, open(a.result, "w"))
'''


def experiment(tmp_path: Path, judge: str, sandbox: list[str], timeout: float = 5) -> Experiment:
    script = tmp_path / "judge.py"
    script.write_text(judge)
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    return Experiment(command=[sys.executable, str(script)], workspace=ws, budget="steps:1", timeout=timeout,
                      seed=0, secrets=b'{"data_seed": 1, "test_secret": "s"}', sandbox=sandbox,
                      cache=tmp_path / "cache", scratch=tmp_path / "home" / "tmp" / "r" / "scratch",
                      private=tmp_path / "home" / "tmp" / "r" / "judge")


def test_children_cannot_read_the_judges_files(tmp_path):
    need_root()
    need_tool("bwrap")
    scratch = tmp_path / "home" / "tmp" / "r" / "scratch"
    box = training_sandbox(61002, hide=[tmp_path / "home"], scratch=scratch, kind="bwrap")
    out = run_experiment(experiment(tmp_path, JUDGE, box.prefix))
    assert out.status == "ok" and out.metrics == {"val_bpb": 1.5}
    seen = json.loads((out.workdir / "result.json").read_text())["seen"]
    assert seen and "error" not in seen, seen
    assert all(v != "read" for v in seen.values()), seen
    assert b"judge log" in out.log, "the runner keeps the log; only the children are kept from it"


def test_hanging_judge_and_its_children_are_killed(tmp_path):
    judge = "import subprocess, time\nsubprocess.Popen(['sleep', '300'])\ntime.sleep(300)\n"
    t0 = time.monotonic()
    out = run_experiment(experiment(tmp_path, judge, [], timeout=0.5))
    assert out.status == "timeout" and time.monotonic() - t0 < 10
    time.sleep(0.2)
    assert "sleep 300" not in os.popen("ps -eo args").read(), "the child outlived its process group"


def test_stop_interrupts_and_cleans_up(tmp_path):
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(Interrupted):
        run_experiment(experiment(tmp_path, "import time\ntime.sleep(300)\n", [], timeout=60), stop)
    assert list((tmp_path / "home" / "tmp" / "r" / "judge").iterdir()) == []


def test_a_judge_without_a_result_is_crashed(tmp_path):
    out = run_experiment(experiment(tmp_path, "import sys\nprint('val_bpb: 0.01')\nsys.exit(0)\n", []))
    assert out.status == "crashed" and out.metrics == {} and b"val_bpb: 0.01" in out.log
