"""The research loop end to end on the instant lab: events, decisions, projections, statuses, Ctrl-C, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.audit import audit
from rloopd.home import Home
from rloopd.loop import Loop, LoopOptions
from rloopd.memory import experiments as ex
from rloopd.memory.state import fold

from .conftest import need_root, rloopd

INSTANT = Path(__file__).parent / "labs" / "instant"


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    dest = tmp_path / "lab"
    shutil.copytree(INSTANT, dest)
    return dest


def set_status(lab: Path, status: str) -> None:
    train = lab / "workspace" / "train.py"
    train.write_text(train.read_text().replace('STATUS = "ok"', f'STATUS = "{status}"'))


def start(home: Home, lab: Path, n: int = 4, seed: int = 0, **kw) -> str:
    return runs.create_run(home, lab, agent=kw.pop("agent", "random"), experiments=n, budget=None, seed=seed,
                           name=kw.pop("name", None), sandbox=kw.pop("sandbox", "auto"))


def test_loop_records_baseline_experiments_and_decisions(home, lab):
    run = start(home, lab, n=6, seed=3)
    state = Loop(home, run).run()
    types = [e.type for e in home.log.read(run)]
    assert types[0] == "run.created" and types[-1] == "run.finished"
    assert types.count("experiment.started") == 7 and types.count("experiment.decided") == 7
    decided = [e.data for e in home.log.read(run, types=["experiment.decided"])]
    assert decided[0]["step"] == 0 and decided[0]["accepted"]
    best = None
    for d in decided:  # accepted exactly when it beat the best so far
        finished = next(e.data for e in home.log.read(run, types=["experiment.finished"]) if e.data["step"] == d["step"])
        value = finished["metrics"]["val_bpb"]
        assert d["accepted"] == (best is None or value < best)
        best = value if d["accepted"] else best
    assert state.best == best and state.experiments == 6 and state.status == "finished"
    started = [e.data for e in home.log.read(run, types=["experiment.started"])]
    assert all(s["category"] in ("learning rate", "depth", "width") for s in started[1:])
    assert all(len(s["params"]) == 1 for s in started[1:]), "random changes one constant per step"
    # the workspace sits at the best commit, and the log audits clean
    assert home.snapshots.tree_equal(state.best_commit, home.run_dir(run) / "workspace")
    assert audit(home.log, home.blobs).ok


def test_results_tsv_and_no_hidden_value_under_the_run(home, lab):
    run = start(home, lab, n=4)
    Loop(home, run).run()
    tsv = (home.run_dir(run) / "memory" / "results.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["step", "commit", "val_bpb", "status", "accepted", "description"]
    assert len(tsv) == 6
    hidden = [e.data["metrics"]["test_bpb"] for e in home.log.read(run, types=["experiment.finished"])]
    secret = json.loads(runs.lab_secrets(home))["test_secret"]
    for path in home.run_dir(run).rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode(errors="replace")
            for v in hidden:
                assert f"{v:.6f}" not in text and str(v) not in text, path
            assert secret not in text
    assert not (home.run_dir(run) / "frozen" / "private").exists()


def test_determinism_under_step_budgets(tmp_path, lab):
    results = []
    for i in range(2):
        with Home.open(tmp_path / f"h{i}") as h:
            run = start(h, lab, n=5, seed=11)
            Loop(h, run).run()
            results.append([(e.data["step"], e.data["commit"], e.data["params"])
                            for e in h.log.read(run, types=["experiment.started"])]
                           + [e.data["metrics"]["val_bpb"] for e in h.log.read(run, types=["experiment.finished"])])
    assert results[0] == results[1]


@pytest.mark.parametrize("status", ["crashed", "oom", "timeout", "invalid"])
def test_every_status_is_recorded_and_the_run_goes_on(home, lab, status):
    set_status(lab, status)
    run = start(home, lab, n=2)
    state = Loop(home, run).run()
    finished = [e.data for e in home.log.read(run, types=["experiment.finished"])]
    assert [f["status"] for f in finished] == [status] * 3
    if status == "crashed":  # the instant lab's judge exits 3 without a result
        assert all(f["reason"] == "the judge exited 3 without a result" for f in finished)
    assert state.status == "finished" and state.experiments == 2 and state.valid == 0 and state.best is None
    assert not any(e.data["accepted"] for e in home.log.read(run, types=["experiment.decided"]))


def test_a_judge_reporting_interrupted_is_crashed_once_not_run_again(home, lab):
    """`interrupted` is the daemon's word (an experiment it ended or an executor lost); the instant lab's
    train.py, which an agent may edit, chooses what its judge reports, so it must not buy re-runs."""
    set_status(lab, "interrupted")
    run = start(home, lab, n=0)
    state = Loop(home, run).run()
    [f] = [e.data for e in home.log.read(run, types=["experiment.finished"])]
    assert (f["attempt"], f["status"]) == (0, "crashed")
    assert f["reason"] == "the judge reported `interrupted`, a status only the daemon records"
    assert len(list(home.log.read(run, types=["experiment.started"]))) == 1
    assert state.status == "finished" and state.retry is None


def test_hanging_judge_is_killed_as_timeout(home, lab):
    set_status(lab, "hang")
    run = start(home, lab, n=0)
    t0 = time.monotonic()
    Loop(home, run).run()
    [f] = [e.data for e in home.log.read(run, types=["experiment.finished"])]
    assert f["status"] == "timeout" and time.monotonic() - t0 < 30
    assert f["reason"] == "the judge passed its hard deadline"  # why, on the event (rloopd show prints it)


def test_fake_numbers_do_not_count(home, lab):
    set_status(lab, "fake")
    run = start(home, lab, n=0)
    Loop(home, run).run()
    [f] = [e.data for e in home.log.read(run, types=["experiment.finished"])]
    assert f["metrics"]["val_bpb"] == pytest.approx(1.9) and f["metrics"]["val_bpb"] != 0.0001


def test_crash_mid_experiment_is_recovered(home, lab):
    run = start(home, lab, n=2)
    base = fold(list(home.log.read(run)))
    # a process that crashed after starting the baseline: started, never finished
    home.log.append(run, [runs_event("experiment.started", {"step": 0, "commit": base.base_commit})])
    (home.run_dir(run) / "workspace" / "train.py").write_text("half-written by a crashed process")
    state = Loop(home, run).run()
    finishes = [(e.data["step"], e.data["attempt"], e.data["status"]) for e in home.log.read(run, types=["experiment.finished"])]
    assert finishes == [(0, 0, "interrupted"), (0, 1, "ok"), (1, 0, "ok"), (2, 0, "ok")]
    assert state.experiments == 2 and state.status == "finished"
    assert home.snapshots.tree_equal(state.best_commit, home.run_dir(run) / "workspace")


def runs_event(type_, data):
    from rloopd.log import NewEvent

    return NewEvent(type_, data)


def test_projections_equal_a_rebuild_after_every_event(home, lab):
    """The loop's own incremental state and the experiments table, after each event, equal a rebuild."""
    run = start(home, lab, n=4)
    table = ex.ExperimentsTable(home.log)
    checked = []

    def check(e):  # called per event once its whole batch is stored and folded
        assert loop.state.position >= e.n
        prefix = list(home.log.read(run, until_n=loop.state.position))
        assert loop.state == fold(prefix), e.type
        table.catch_up()
        rows = {(r["run"], r["step"], r["replica"]): r for r in table.rows(run)}
        assert rows == ex.rebuild(prefix), e.type
        checked.append(e.n)

    loop = Loop(home, run, LoopOptions(on_event=check))
    final = loop.run()
    events = list(home.log.read(run))
    assert final == fold(events) and len(checked) == len(events) - 1  # all but run.created, seen live


def test_runs_get_their_own_uids_and_no_sandbox_is_a_warning(home, lab):
    a, b = start(home, lab, n=0), start(home, lab, n=0)
    uids = [next(home.log.read(r)).data["uid"] for r in (a, b)]
    assert uids[0] != uids[1]
    c = start(home, lab, n=0, sandbox="none")
    [warned] = [e.data for e in home.log.read(c, types=["run.warned"])]
    assert warned["about"] == "sandbox" and "secrets" in warned["message"]
    proc = rloopd("status", home=home.path)
    assert f"warning: run {c}" in proc.stdout and "secrets" in proc.stdout and f"warning: run {a}" not in proc.stdout
    if os.geteuid() == 0:  # setpriv alone confines less than bubblewrap: said too
        d = start(home, lab, n=0, sandbox="setpriv")
        [warned] = [e.data for e in home.log.read(d, types=["run.warned"])]
        assert warned["about"] == "sandbox" and "install bubblewrap" in warned["message"]


def test_ctrl_c_stops_the_run_cleanly(home_dir, lab):
    set_status(lab, "hang")
    proc = subprocess.Popen([sys.executable, "-m", "rloopd", "run", "--lab", str(lab), "-n", "3", "--json",
                             "--home", str(home_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if (home_dir / "events.db").exists():
            with Home.open(home_dir, create=False) as h:
                if list(h.log.read(types=["experiment.started"])):
                    break
    proc.send_signal(signal.SIGINT)
    out, errs = proc.communicate(timeout=60)
    assert proc.returncode == 130, errs
    assert json.loads(out.splitlines()[-1])["status"] == "stopped"
    with Home.open(home_dir, create=False) as h:
        [run] = [e.stream for e in h.log.runs()]
        types = [(e.type, e.data.get("status")) for e in h.log.read(run)]
        assert types[-2:] == [("experiment.finished", "interrupted"), ("run.stopped", None)]
        assert audit(h.log, h.blobs).ok
    assert not [p for p in os.popen("ps -eo args").read().splitlines() if str(lab) in p and "experiment.py" in p]


@pytest.mark.parametrize("case,args,words", [
    ("toml", [], ["rloop.toml"]),
    ("param", [], ["params.DEPTH", "no module-level constant"]),
    ("entry", [], ["command", "does not exist"]),
    ("budget0", ["--budget", "0"], ["--budget"]),
    ("budgetneg", ["--budget", "-5"], ["--budget"]),
    ("agent", ["--agent", "gpt-9"], ["--agent"]),
    ("sandbox", ["--sandbox", "bogus"], ["--sandbox", "bogus"]),
    ("nolab", [], ["rloop.toml", "no such file"]),
])
def test_bad_input_is_one_line_and_appends_nothing(home_dir, home, lab, case, args, words):
    home.log.append_one("home", "daemon.started", {"version": "x"})
    if case == "toml":
        (lab / "rloop.toml").write_text("name = 'x'\nbudget = [\n")
    elif case == "param":
        (lab / "workspace" / "train.py").write_text((lab / "workspace" / "train.py").read_text().replace("DEPTH = 2", "DEEP = 2"))
    elif case == "entry":
        (lab / "frozen" / "experiment.py").rename(lab / "frozen" / "other.py")
    elif case == "nolab":
        shutil.rmtree(lab)
        lab.mkdir()
    before = home.log.last_seq()
    proc = rloopd("run", "--lab", str(lab), *args, home=home_dir)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0]
    assert home.log.last_seq() == before


def test_unknown_run_and_step(home_dir, home, lab):
    run = start(home, lab, n=1)
    Loop(home, run).run()
    proc = rloopd("show", "nope", "1", home=home_dir)
    assert proc.returncode == 2 and "nope" in proc.stderr
    proc = rloopd("show", run, "9", home=home_dir)
    assert proc.returncode == 2 and "no step 9" in proc.stderr
    detail = json.loads(rloopd("show", run, "1", "--json", home=home_dir, check=True).stdout)
    assert detail["decision"] is not None and detail["diff"].startswith("diff --git")
    status = json.loads(rloopd("status", "--json", home=home_dir, check=True).stdout)
    assert status[0]["run_id"] == run and status[0]["experiments"] == 1


def test_unreadable_lab(home_dir, lab):
    need_root()
    import tempfile
    public = Path(tempfile.mkdtemp(prefix="rloopd-lab-"))
    public.chmod(0o755)
    try:
        shutil.copytree(lab, public / "lab")
        (public / "lab").chmod(0o700)
        h = public / "home"
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                               "rloopd", "run", "--lab", str(public / "lab"), "--home", str(h)],
                              capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
        assert proc.returncode == 2 and "--lab" in proc.stderr and "not readable" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (public / "home" / "events.db").exists()
    finally:
        shutil.rmtree(public)


def test_run_json_summary(home_dir, lab):
    proc = rloopd("run", "--lab", str(lab), "-n", "3", "--seed", "2", "--name", "lr-sweep", "--json", home=home_dir)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout.splitlines()[-1])
    assert {"run_id", "name", "metric", "experiments", "accepted", "best", "best_step", "floor"} <= set(s)
    assert s["name"] == "lr-sweep" and s["metric"] == "val_bpb" and s["experiments"] == 3 and s["floor"] == 1.0
    assert rloopd("run", "--lab", str(lab), "--name", "lr-sweep", home=home_dir).returncode == 2


@pytest.mark.slow
def test_reference_lab_trains_through_the_loop_deterministically(tmp_path):
    """The real lab, really trained, inside the sandbox: the same seed gives the same numbers."""
    root = Path(__file__).resolve().parents[1]
    with Home.open(tmp_path / "home") as h:
        values = []
        for _ in range(2):
            run = runs.create_run(h, root, agent="random", experiments=0, budget="steps:8", seed=5, name=None)
            state = Loop(h, run).run()
            [f] = [e.data for e in h.log.read(run, types=["experiment.finished"])]
            assert f["status"] == "ok", h.blobs.get_text(f["log_blob"])[-2000:]
            assert f["metrics"]["train_steps"] == 8 and f["metrics"]["val_bpb"] > f["metrics"]["oracle_bpb"]
            values.append((f["metrics"]["val_bpb"], f["metrics"]["test_bpb"]))
            assert state.checkpoint_blob is not None
            assert (h.run_dir(run) / "memory" / "checkpoint.pt").read_bytes() == h.blobs.get(state.checkpoint_blob)
        assert values[0] == values[1]
        if shutil.which("bwrap"):
            assert next(h.log.read(run)).data["sandbox"] == "bwrap"


def test_run_directory_equals_a_rebuild_from_the_log(home, lab, tmp_path):
    from rloopd.memory.rundir import MemoryFiles, materialize_frozen, project_memory

    run = start(home, lab, n=4)
    Loop(home, run).run()
    events = list(home.log.read(run))
    mem = MemoryFiles()
    for e in events:
        mem.apply(e)
    scratch = tmp_path / "rebuilt"
    rows = [r for _, r in sorted(ex.rebuild(events).items())]
    project_memory(scratch, mem, home.blobs, ex.results_tsv(rows, "val_bpb"))
    materialize_frozen(scratch, events[0].data["manifest"], home.blobs)
    live = home.run_dir(run)
    for rel in ("program.md", "memory/results.tsv", "memory/notes.md", "memory/checkpoint.pt", "frozen/experiment.py"):
        assert (scratch / rel).read_bytes() == (live / rel).read_bytes(), rel
    assert json.loads((live / "memory" / "checkpoint.pt").read_text())  # the best step's stand-in model


def test_memory_holds_only_what_the_log_says(home, lab):
    run = start(home, lab, n=0)
    loop = Loop(home, run)
    loop.run()
    memory = home.run_dir(run) / "memory"
    (memory / "stray.txt").write_text("not in the log")
    (memory / "artifacts" / "plot.png").write_bytes(b"png")
    blob = home.blobs.put(b"kept")
    home.log.append(run, [runs_event("memory.written", {"path": "artifacts/table.csv", "blob": blob})])
    loop.project()
    assert not (memory / "stray.txt").exists() and not (memory / "artifacts" / "plot.png").exists()
    assert (memory / "artifacts" / "table.csv").read_bytes() == b"kept"
    home.log.append(run, [runs_event("memory.written", {"path": "artifacts/table.csv", "blob": None})])
    loop.project()
    assert not (memory / "artifacts" / "table.csv").exists() and (memory / "artifacts").is_dir()
