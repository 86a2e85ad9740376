"""The Ray executor's failure paths against a stand-in for the `ray` module (no cluster, so these run in
`make test`; tests/test_ray_executor.py runs the real cluster): a connection lost while the task is
submitted is a loss that is run again, not a failed run; a GPU node missing just now is a loss, a lab
larger than any node seen is a crash; the head's disk filling while the outcome is written is the storage
error the daemon stalls on; a stop right after a loss opens no new attempt."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from rloopd import ray_executor, runs
from rloopd.home import Home
from rloopd.loop import Loop, LoopOptions, Stop
from rloopd.ray_executor import RayExecutor
from rloopd.runner import Experiment, Outcome, Portable
from rloopd.service import storage_full

from .daemon_helpers import make_lab


class RayError(Exception):
    pass


class WorkerCrashedError(RayError):
    pass


class FakeRay:
    """What RayExecutor calls of `ray`; a task "runs" at submission and returns `result`."""

    exceptions = SimpleNamespace(RayError=RayError, RayTaskError=type("RayTaskError", (RayError,), {}),
                                 OutOfMemoryError=type("OutOfMemoryError", (RayError,), {}),
                                 WorkerCrashedError=WorkerCrashedError)

    def __init__(self, gpus: int = 0, result: dict | None = None):
        self.gpus, self.alive, self.put_failures, self.submitted = gpus, gpus, 0, 0
        self.result = result or {"status": "ok", "metrics": {"val_bpb": 1.5}, "log": b"fake\n", "wall": 0.01,
                                 "model": None}

    def cluster_resources(self) -> dict:
        return {"CPU": 2, **({"GPU": self.gpus} if self.gpus else {})}

    def nodes(self) -> list[dict]:
        return [{"Alive": True, "Resources": {"CPU": 2, "GPU": self.alive}}] if self.alive else []

    def put(self, value):
        if self.put_failures:
            self.put_failures -= 1
            raise ConnectionError("GCS has been unreachable for 60 s")
        return value

    def remote(self, fn):
        fake = self

        class Task:
            def options(self, **kw):
                return self

            def remote(self, *args):
                fake.submitted += 1
                return dict(fake.result)

        return Task()

    def wait(self, refs, timeout=None):
        return refs, []

    def get(self, ref):
        return ref

    def cancel(self, ref, force=False):
        pass


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(ray_executor, "MAX_BACKOFF", 0.01)


def experiment(tmp: Path, gpus: int = 0) -> Experiment:
    for d in ("ws", "lab"):
        (tmp / d).mkdir(exist_ok=True)
    (tmp / "ws" / "train.py").write_text("X = 1\n")
    return Experiment(command=["true"], workspace=tmp / "ws", budget="steps:1", timeout=1, seed=0, secrets=b"{}",
                      sandbox=[], cache=tmp / "cache", scratch=tmp / "scratch", private=tmp / "judge",
                      portable=Portable(lab=tmp / "lab", command=["{python}"], gpus=gpus, sandbox="none", uid=None,
                                        label="r-s0-r0"))


def finished(home: Home, run: str) -> list[dict]:
    return [e.data for e in home.log.read(run, types=["experiment.finished"])]


def test_a_connection_lost_at_submission_is_a_loss_run_again(home, tmp_path):
    ray = FakeRay()
    ray.put_failures = 1
    run = runs.create_run(home, make_lab(tmp_path), agent="random", experiments=0, budget=None, seed=0, name=None)
    state = Loop(home, run, LoopOptions(execute=RayExecutor(ray).run)).run()
    rows = finished(home, run)
    assert [(r["attempt"], r["status"]) for r in rows] == [(0, "interrupted"), (1, "ok")], rows
    assert rows[0]["reason"] == ("lost on the Ray cluster before the task started (ConnectionError): "
                                 "GCS has been unreachable for 60 s")
    assert state.status == "finished" and state.best == 1.5 and ray.submitted == 1


def test_a_gpu_node_missing_now_is_a_loss_and_a_lab_larger_than_any_node_crashes(tmp_path):
    ray = FakeRay(gpus=2)
    executor = RayExecutor(ray)
    assert executor.run(experiment(tmp_path, gpus=1)).status == "ok"
    ray.alive = 0  # the GPU node reboots
    out = executor.run(experiment(tmp_path, gpus=1))
    assert (out.status, out.lost) == ("interrupted", True) and executor.losses == 1
    assert out.reason == "no live node of the Ray cluster has 1 GPUs just now (the largest has 0; 2 seen before)"
    out = executor.run(experiment(tmp_path, gpus=4))
    assert (out.status, out.lost) == ("crashed", False) and ray.submitted == 1
    assert out.reason == "the lab asks for 4 GPUs per experiment and no node of the Ray cluster has had more than 2"
    ray.alive = 2
    assert executor.run(experiment(tmp_path, gpus=2)).status == "ok" and executor.losses == 0


def test_a_full_head_disk_while_writing_the_outcome_is_the_storage_error(tmp_path, monkeypatch):
    executor = RayExecutor(FakeRay(result={"status": "ok", "metrics": {"val_bpb": 1.0}, "log": b"", "wall": 0.1,
                                           "model": b"weights"}))
    write = Path.write_bytes

    def full(self, data):
        if self.name == "model.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return write(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as e:
        executor.run(experiment(tmp_path))
    assert storage_full(e.value).startswith("No space left on device") and executor.losses == 0
    assert not list((tmp_path / "judge").iterdir()), "nothing half-written in the judge's directory"


def test_a_stop_right_after_a_loss_opens_no_new_attempt(home, tmp_path):
    stop = Stop()

    def lose(exp: Experiment, event: threading.Event | None) -> Outcome:
        stop.set("paused")  # the pause arrives while the lost task is being recorded
        return Outcome("interrupted", {}, b"", 0.0, reason="node died", lost=True)

    run = runs.create_run(home, make_lab(tmp_path), agent="random", experiments=0, budget=None, seed=0, name=None)
    state = Loop(home, run, LoopOptions(execute=lose, stop=stop)).run()
    assert [(r["attempt"], r["status"]) for r in finished(home, run)] == [(0, "interrupted")]
    assert len(list(home.log.read(run, types=["experiment.started"]))) == 1 and state.status == "paused"
    assert state.retry is not None and state.retry.attempt == 1, "resuming starts the lost attempt again"
