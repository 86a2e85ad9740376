"""The Ray executor on a real local cluster: 2 CPUs and 2 fake GPUs, started once for the module, with Ray's
token authentication on (a token in the environment, so nothing is written to ~/.ray).

What is asserted: concurrent tasks see their own CUDA_VISIBLE_DEVICES (the judge reports what it saw, and
no RAY_ variable reaches it); a worker killed mid-experiment is recorded `interrupted` and run again to a
real result, its judge gone with it; a stop cancels the task and kills its judge; under `steps:N` budgets
the metrics equal the local executor's for the same seeds (the instant lab exactly; the reference lab with
tiny constants within REF_TOLERANCE); `rloopd serve --executor ray` drives runs to the end and records a
lab whose dependency the node lacks as `crashed` with the reason, serving on; an unreachable address is
one line naming it; the local path never imports Ray. `make test-slow` runs these, not `make test`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.home import Home
from rloopd.loop import Loop, LoopOptions, Stop
from rloopd.memory.state import parse_at

from .conftest import need_module, rloopd
from .daemon_helpers import Served, detach, events, make_lab, state, wait_for
from .labfixtures.harness import ROOT, TINY

pytestmark = pytest.mark.extended

REF_TOLERANCE = 1e-4  # bits per byte: one process with 1 thread (Ray's OMP_NUM_THREADS=1) against 2 locally
EXPERIMENT_PY = Path("frozen") / "experiment.py"


def need_ray():
    return need_module("ray", "ray")


@pytest.fixture(scope="module")
def cluster():
    """(ray, executor, GCS address) of a local cluster with token authentication, shut down after the module."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))  # before Ray reads its config
    ray = need_ray()
    from rloopd.ray_executor import connect

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, namespace="rloopd-test")
    try:
        yield ray, connect(None), ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def observing_lab(tmp: Path, name: str = "lab", **constants) -> Path:
    """The instant lab whose judge also reports, as metrics, the GPU it was given and whether a RAY_ variable
    reached it."""
    lab = make_lab(tmp, name, **constants)
    entry = lab / EXPERIMENT_PY
    entry.write_text(entry.read_text().replace(
        "Path(a.result).write_text(json.dumps(result))",
        'result["cuda_device"] = int(os.environ.get("CUDA_VISIBLE_DEVICES") or -1)\n'
        'result["saw_ray_variable"] = int(any(k.startswith("RAY_") for k in os.environ))\n'
        "Path(a.result).write_text(json.dumps(result))"))
    return lab


def create(home_dir: Path, lab: Path, n: int, seed: int = 0, budget: str | None = None) -> str:
    with Home.open(home_dir) as h:
        return runs.create_run(h, lab, agent="random", experiments=n, budget=budget, seed=seed, name=None)


def drive(home_dir: Path, run: str, execute=None, stop: Stop | None = None) -> threading.Thread:
    """Loop(run).run() in a thread of its own, with its own connection to the log (as the daemon does)."""
    def target() -> None:
        with Home.open(home_dir) as h:
            Loop(h, run, LoopOptions(execute=execute, stop=stop)).run()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def finished(home_dir: Path, run: str) -> list[dict]:
    return [e["data"] | {"at": e["at"]} for e in events(home_dir, run, "experiment.finished")]


def log_text(home_dir: Path, blob: str) -> str:
    with Home.open(home_dir, create=False) as h:
        return h.blobs.get_text(blob)


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                found[int(d.name)] = (ppid, (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, IndexError, ValueError):
                pass
    return found


def task_and_judge(run: str, timeout: float = 30) -> tuple[int, int]:
    """(worker pid, judge pid) of the run's task, once its judge runs: Ray titles the worker `ray::<task name>`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = processes()
        for pid, (_, cmd) in procs.items():
            if cmd.startswith(f"ray::rloopd-{run}-"):
                judges = [p for p, (ppid, c) in procs.items() if ppid == pid and "experiment.py" in c]
                if judges:
                    return pid, judges[0]
        time.sleep(0.05)
    raise AssertionError(f"no Ray task of run {run} with a judge")


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_concurrent_tasks_each_see_their_own_gpu(cluster, tmp_path):
    _, executor, _ = cluster
    lab, home_dir = observing_lab(tmp_path, SLEEP=2.5), tmp_path / "home"
    a, b = create(home_dir, lab, n=1, seed=1), create(home_dir, lab, n=1, seed=2)
    for t in [drive(home_dir, a, executor.run), drive(home_dir, b, executor.run)]:
        t.join(90)
    rows = finished(home_dir, a) + finished(home_dir, b)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    for r in rows:  # what the judge saw is what the task was given, and no RAY_ variable (the token) reached it
        header = log_text(home_dir, r["log_blob"]).splitlines()[0]
        assert header.endswith(f"CUDA_VISIBLE_DEVICES={r['metrics']['cuda_device']}"), header
        assert r["metrics"]["cuda_device"] in (0, 1) and r["metrics"]["saw_ray_variable"] == 0
    spans = [(parse_at(r["at"]).timestamp() - r["wall_seconds"], parse_at(r["at"]).timestamp(),
              r["metrics"]["cuda_device"]) for r in rows]
    overlapping = [(x, y) for i, x in enumerate(spans) for y in spans[i + 1:] if x[0] < y[1] and y[0] < x[1]]
    assert overlapping, spans  # the two runs' experiments ran at the same time ...
    assert all(x[2] != y[2] for x, y in overlapping)  # ... each on a GPU of its own


def test_a_worker_killed_mid_run_is_interrupted_and_run_again(cluster, tmp_path):
    _, executor, _ = cluster
    home_dir = tmp_path / "home"
    run = create(home_dir, make_lab(tmp_path, SLEEP=2.0), n=0)
    thread = drive(home_dir, run, executor.run)
    worker, judge = task_and_judge(run)
    os.kill(worker, signal.SIGKILL)  # as a node's OOM killer or a lost node would
    thread.join(90)
    rows = finished(home_dir, run)
    assert [(r["attempt"], r["status"]) for r in rows] == [(0, "interrupted"), (1, "ok")], rows
    assert rows[0]["reason"].startswith("lost on the Ray cluster (WorkerCrashedError)")
    assert rows[1]["metrics"]["val_bpb"] > 0
    s = state(home_dir, run)
    assert s.status == "finished" and s.best == rows[1]["metrics"]["val_bpb"]
    wait_for(lambda: not alive(judge), 10, "the killed worker's judge to die with it (pdeathsig)")
    tmp = Path(tempfile.gettempdir())  # what the killed task left there, the next task on the node removed
    assert not [*tmp.glob(f"rloopd-task-{worker}-*"), *tmp.glob(f"rloopd-scratch-{worker}-*")]


def test_a_stop_cancels_the_task_and_its_judge(cluster, tmp_path):
    _, executor, _ = cluster
    home_dir, stop = tmp_path / "home", Stop()
    run = create(home_dir, make_lab(tmp_path, SLEEP=60.0), n=0)
    thread = drive(home_dir, run, executor.run, stop)
    _, judge = task_and_judge(run)
    t0 = time.monotonic()
    stop.set("paused")
    thread.join(30)
    assert time.monotonic() - t0 < 10
    assert [r["status"] for r in finished(home_dir, run)] == ["interrupted"] and state(home_dir, run).status == "paused"
    wait_for(lambda: not alive(judge), 10, "the cancelled task's judge to be killed")


def test_step_budgets_give_the_local_metrics(cluster, tmp_path):
    """Same lab, same seeds, one home (same data secrets): the Ray run's record equals the local one's."""
    _, executor, _ = cluster
    home_dir, lab = tmp_path / "home", make_lab(tmp_path)
    local, remote = create(home_dir, lab, n=4, seed=7), create(home_dir, lab, n=4, seed=7)
    drive(home_dir, local).join(60)
    drive(home_dir, remote, executor.run).join(90)

    def record(run: str) -> list:
        decided = [(e["data"]["step"], e["data"]["accepted"]) for e in events(home_dir, run, "experiment.decided")]
        return [(r["step"], r["status"], r["metrics"]) for r in finished(home_dir, run)] + decided

    assert record(local) == record(remote) and len(record(local)) == 10
    assert all(r["status"] == "ok" for r in finished(home_dir, remote))


def reference_lab(tmp: Path) -> Path:
    """The reference lab with tiny constants, a 64 KB synthetic source and a short evaluation (~8 s a run)."""
    lab = tmp / "ref"
    lab.mkdir()
    for name in ("program.md", "rloop.toml"):
        shutil.copy(ROOT / name, lab / name)
    for d in ("workspace", "frozen"):
        shutil.copytree(ROOT / d, lab / d, ignore=shutil.ignore_patterns("__pycache__"))
    from rloopd.lab import set_constants

    train = lab / "workspace" / "train.py"
    train.write_text(set_constants(train.read_text(), {**TINY, "WIDTH": 64}))  # 64: the smallest of [params]
    toml = lab / "rloop.toml"
    toml.write_text(toml.read_text().replace('source = "synthetic"', 'source = "synthetic:64K"').replace(
        '"{lab}/frozen/experiment.py"]', '"{lab}/frozen/experiment.py", "--eval-bytes", "8192"]'))
    return lab


def test_the_reference_lab_under_steps_gives_the_local_metric(cluster, tmp_path):
    pytest.importorskip("torch")
    _, executor, _ = cluster
    home_dir, lab = tmp_path / "home", reference_lab(tmp_path)
    local, remote = (create(home_dir, lab, n=0, seed=5, budget="steps:3") for _ in range(2))
    drive(home_dir, local).join(120)
    drive(home_dir, remote, executor.run).join(120)
    [here], [there] = finished(home_dir, local), finished(home_dir, remote)
    assert here["status"] == there["status"] == "ok", log_text(home_dir, there["log_blob"])[-2000:]
    assert there["metrics"]["train_steps"] == here["metrics"]["train_steps"] == 3
    assert abs(there["metrics"]["val_bpb"] - here["metrics"]["val_bpb"]) <= REF_TOLERANCE, (here, there)
    assert log_text(home_dir, there["log_blob"]).startswith(f"rloopd: Ray task rloopd-{remote}-s0-r0 on ")


def test_the_daemon_runs_on_the_cluster_and_survives_a_node_without_the_labs_dependencies(cluster, tmp_path):
    _, _, address = cluster
    home_dir = tmp_path / "home"
    broken = make_lab(tmp_path, "broken")
    entry = broken / EXPERIMENT_PY
    entry.write_text("import rloopd_absent_dependency  # what this node lacks\n" + entry.read_text())
    daemon = Served(home_dir, "--executor", "ray", "--ray-address", address).start()
    try:
        bad = detach(home_dir, broken, "-n", "0")
        good = detach(home_dir, make_lab(tmp_path), "-n", "2")
        for run in (bad, good):
            wait_for(lambda run=run: state(home_dir, run).status == "finished", 90, f"run {run} to finish")
        [crash] = finished(home_dir, bad)
        assert crash["status"] == "crashed"
        assert "No module named 'rloopd_absent_dependency'" in crash["reason"], crash
        rows = finished(home_dir, good)
        assert [r["status"] for r in rows] == ["ok"] * 3
        assert all(log_text(home_dir, r["log_blob"]).startswith(f"rloopd: Ray task rloopd-{good}-") for r in rows)
        assert daemon.proc.poll() is None and rloopd("status", "--json", home=home_dir).returncode == 0
        started = events(home_dir, "home", "daemon.started")[-1]["data"]
        assert started["recovery"]["slots"] == ["ray-gpu0", "ray-gpu1"]  # the pool: the cluster's GPUs
        assert "token authentication is off" not in daemon.output()  # the daemon holds the cluster's token
    finally:
        daemon.close()


def test_an_unreachable_ray_address_is_one_line(tmp_path):
    proc = rloopd("serve", "--executor", "ray", "--ray-address", "127.0.0.1:1", home=tmp_path / "home", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "ray_address 127.0.0.1:1 (--ray-address): no Ray cluster answers there" in proc.stderr
    (tmp_path / "rloopd.toml").write_text('executor = "ray"\nray_address = "127.0.0.1:1"\n')
    proc = rloopd("serve", "--config", str(tmp_path / "rloopd.toml"), home=tmp_path / "home", timeout=60)
    assert proc.returncode == 2 and f"ray_address 127.0.0.1:1 (in {tmp_path / 'rloopd.toml'})" in proc.stderr


def test_the_local_path_never_imports_ray(tmp_path):
    code = ("import sys, rloopd.cli, rloopd.cli_daemon, rloopd.service, rloopd.loop, rloopd.ray_executor\n"
            "from rloopd.config import settings\n"
            f"assert settings(None, {str(tmp_path)!r}).executor == 'local'\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))")
    proc = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_an_executor_that_loses_a_step_every_time_ends_it_as_crashed(tmp_path):
    """A lost outcome (`Outcome.lost`, the path a lost Ray task takes) is run again at once, LOST_LIMIT times
    at most; a judge that reports `interrupted` itself buys no re-run (tests/test_loop.py)."""
    from rloopd.loop import LOST_LIMIT
    from rloopd.runner import Outcome

    def lose(exp, stop):
        return Outcome("interrupted", {}, b"", 0.0, reason="the node died", lost=True)

    home_dir = tmp_path / "home"
    run = create(home_dir, make_lab(tmp_path), n=0)
    drive(home_dir, run, lose).join(60)
    rows = finished(home_dir, run)
    assert [r["attempt"] for r in rows] == list(range(LOST_LIMIT))
    assert [r["status"] for r in rows] == ["interrupted"] * (LOST_LIMIT - 1) + ["crashed"]
    assert rows[-1]["reason"] == f"lost {LOST_LIMIT} times in a row; last: the node died"
    assert state(home_dir, run).status == "finished"
