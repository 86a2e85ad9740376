"""rloopd replay --reexecute: recorded experiments trained again from their commits, frozen files and seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.home import Home
from rloopd.log import NewEvent, new_id
from rloopd.loop import Loop
from rloopd.reexecute import reexecute

from .conftest import rloopd
from .daemon_helpers import make_lab


@pytest.fixture
def finished(home, tmp_path):
    run = runs.create_run(home, make_lab(tmp_path), agent="random", experiments=4, budget=None, seed=3, name="r")
    Loop(home, run).run()
    return run


def test_every_step_of_a_run_reproduces(home, finished):
    proc = rloopd("replay", finished, "--reexecute", "all", "--json", home=home.path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and [r["step"] for r in report["reexecuted"]] == [0, 1, 2, 3, 4]
    for r in report["reexecuted"]:
        assert r["reproduced"] and r["difference"] == 0 and r["measured"] == r["recorded"]
        assert r["budget"] == "steps:10"  # the recorded number of training steps, not the run's budget text
    accepted = [e.data["step"] for e in home.log.read(finished, types=["experiment.decided"]) if e.data["accepted"]]
    assert [r.step for r in reexecute(home, finished, "accepted")] == accepted
    assert len(list(home.log.read(finished))) == report["events"]  # re-execution appends nothing


def doctor(home: Home, run: str, step: int, value: float) -> str:
    """A consistent rewrite of `run` under a new id with one metric changed: its chain verifies, its claim
    is false. Only re-executing the step catches it."""
    doctored = new_id()[:12]
    batch = []
    for e in home.log.read(run):
        data = dict(e.data)
        if e.type == "run.created":
            data["name"] = "doctored"
        if e.type == "experiment.finished" and data["step"] == step:
            data["metrics"] = {**data["metrics"], "val_bpb": value}
        batch.append(NewEvent(e.type, data))
    home.log.append(doctored, batch, expected_n=0)
    Loop(home, doctored).project()
    return doctored


def test_a_doctored_metric_is_flagged(home, finished):
    doctored = doctor(home, finished, 2, 0.123)
    assert rloopd("replay", doctored, home=home.path).returncode == 0  # the log itself is consistent
    proc = rloopd("replay", doctored, "--reexecute", "1-2", home=home.path)
    assert proc.returncode == 1
    assert "1 of 2 re-executed steps did not reproduce" in proc.stderr and "step 2 recorded 0.123" in proc.stderr
    assert "step" in proc.stdout and "no" in proc.stdout  # the table, recorded against measured
    loose = rloopd("replay", doctored, "--reexecute", "2", "--tolerance", "100", home=home.path)
    assert loose.returncode == 0, loose.stderr


@pytest.mark.parametrize("args, words", [
    (["--reexecute", "99"], "has no finished step 99"),
    (["--reexecute", "two"], "--reexecute 'two'"),
    (["--reexecute", "1", "--tolerance", "-1"], "--tolerance -1"),
])
def test_bad_steps_are_one_line_and_train_nothing(home, finished, args, words):
    before = len(list(home.log.read()))
    proc = rloopd("replay", finished, *args, home=home.path)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert len(list(home.log.read())) == before


@pytest.mark.slow
def test_a_recorded_cpu_experiment_reproduces(tmp_path):
    """The reference lab, really trained (in the sandbox), then re-executed: a steps budget reproduces exactly."""
    root = Path(__file__).resolve().parents[1]
    with Home.open(tmp_path / "home") as h:
        run = runs.create_run(h, root, agent="random", experiments=0, budget="steps:12", seed=7, name=None)
        Loop(h, run).run()
        [f] = [e.data for e in h.log.read(run, types=["experiment.finished"])]
        assert f["status"] == "ok", h.blobs.get_text(f["log_blob"])[-2000:]
        [r] = reexecute(h, run, "0", tolerance=0.0)
        assert r.budget == "steps:12" and r.status == "ok"
        assert r.reproduced and r.difference == 0.0 and r.measured == f["metrics"]["val_bpb"], r
