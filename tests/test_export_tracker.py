"""`rloopd export-mlflow`: runs of the instant lab written into a real sqlite MLflow store and read back with
MLflow's own client; a second export adds nothing, a run that moved on gets only its new steps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rloopd import runs
from rloopd.export_tracker import RUN_ID_TAG, TrackerError, export_mlflow, open_mlflow
from rloopd.fork import fork_run
from rloopd.history import history
from rloopd.home import Home
from rloopd.lab import space_label
from rloopd.loop import Loop, LoopOptions, Stop

from .conftest import need_module, rloopd
from .daemon_helpers import make_lab

EXP = "rloopd"
# mlflow 3.17's store on sqlalchemy 2.1 warns about its own use of `noload`: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def need_mlflow():
    return need_module("mlflow", "mlflow")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A fresh MLflow database, made once: creating its schema takes seconds; each test copies it."""
    need_mlflow()
    db = tmp_path_factory.mktemp("store") / "empty.db"
    open_mlflow(f"sqlite:///{db}")
    return db


@pytest.fixture
def store(empty_store: Path, tmp_path: Path) -> str:
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(empty_store, db)
    return f"sqlite:///{db}"


def client(uri: str):
    return need_mlflow().MlflowClient(tracking_uri=uri)


def mlflow_run(uri: str, run: str):
    c = client(uri)
    exp = c.get_experiment_by_name(EXP)
    found = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run}'")
    assert len(found) == 1, f"one MLflow run per rloopd run, found {len(found)}"
    return found[0]


def history_of(uri: str, rid: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(rid, key))


def expected(home: Home, run: str) -> dict[str, list[tuple[int, float]]]:
    """The metric history the log says, computed here independently of rloopd.export_tracker."""
    out: dict[str, list[tuple[int, float]]] = {"val_bpb": [], "best_val_bpb": [], "accepted": []}
    for e in history(home.log, run):
        d = e.data
        if e.type == "experiment.finished" and d["status"] == "ok" and not d.get("replica"):
            out["val_bpb"].append((d["step"], d["metrics"]["val_bpb"]))
        elif e.type == "experiment.decided":
            out["best_val_bpb"].append((d["step"], d["best_after"]))
            out["accepted"].append((d["step"], float(d["accepted"])))
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.extended  # an MLflow store's schema takes seconds to create, each export a few more
def test_export_matches_the_log_and_a_second_export_adds_nothing(home_dir, tmp_path, store):
    lab = make_lab(tmp_path)
    with Home.open(home_dir) as h:
        run = runs.create_run(h, lab, agent="random", experiments=5, budget=None, seed=3, name="r1")
        Loop(h, run).run()
        created = next(h.log.read(run)).data
        want = expected(h, run)
    proc = rloopd("export-mlflow", "r1", "--tracking-uri", store, "--json", home=home_dir, check=True)
    summary = json.loads(proc.stdout)["runs"][0]
    assert summary["created"] and summary["run"] == run and summary["metrics_added"] > 0

    r = mlflow_run(store, run)
    assert r.info.run_id == summary["mlflow_run_id"] and r.info.run_name == "r1" and r.info.status == "FINISHED"
    p = r.data.params
    assert {k: p[k] for k in ("agent", "seed", "metric", "direction", "lab", "budget", "memory_policy")} == {
        "agent": "random", "seed": "3", "metric": "val_bpb", "direction": "minimize", "lab": "instant",
        "budget": "steps:10", "memory_policy": "notes"}
    assert p["lab_manifest"] == runs.manifest_digest(created) and p["program_blob"] == created["program_blob"]
    assert p["search_space"] == space_label(created["search_space"]) and "lineage" not in p
    tags = r.data.tags
    assert tags["rloopd.home"] == str(home_dir.absolute()) and tags["rloopd.status"] == "finished"
    assert tags["rloopd.experiments"] == "5" and tags["rloopd.program_versions"] == "1"
    for key, points in want.items():
        assert history_of(store, r.info.run_id, key) == points, key
    assert [s for s, _ in want["val_bpb"]] == list(range(6))
    names = {a.path for a in client(store).list_artifacts(r.info.run_id)}
    assert names == {"results.tsv", "program.md", "curves.png", "ideas.png"}  # the random agent writes no notes
    got = Path(client(store).download_artifacts(r.info.run_id, "results.tsv", str(tmp_path)))
    assert got.read_text() == (home_dir / "runs" / run / "memory" / "results.tsv").read_text()
    assert got.is_relative_to(tmp_path) and (Path(store.removeprefix("sqlite:///")).parent / "mlartifacts").is_dir()

    with Home.open(home_dir, create=False) as h:  # again: nothing added, nothing doubled
        again = export_mlflow(h, ["r1"], store, EXP)[0]
    assert again["mlflow_run_id"] == r.info.run_id and not again["created"]
    assert (again["metrics_added"], again["params_added"], again["artifacts"]) == (0, 0, [])
    assert len(client(store).search_runs([r.info.experiment_id])) == 1
    for key, points in want.items():
        assert history_of(store, r.info.run_id, key) == points, key


@pytest.mark.extended
def test_a_run_that_moved_on_gets_only_its_new_steps_and_a_fork_its_history(home, tmp_path, store):
    lab = make_lab(tmp_path)
    run = runs.create_run(home, lab, agent="random", experiments=6, budget=None, seed=5, name="r2")
    stop = Stop()

    def halt(e):  # a daemon going down after step 2: the run stays `running` and resumes later
        if e.type == "experiment.decided" and e.data["step"] == 2:
            stop.set("shutdown")

    Loop(home, run, LoopOptions(stop=stop, on_event=halt)).run()
    first = export_mlflow(home, [run], store, EXP)[0]
    r = mlflow_run(store, run)
    assert r.info.status == "RUNNING" and r.data.tags["rloopd.status"] == "running"
    assert [s for s, _ in history_of(store, r.info.run_id, "best_val_bpb")] == [0, 1, 2]

    notes = b"# notes\nwider helps\n"  # what a session agent's notes would be (the random agent writes none)
    home.log.append_one(run, "memory.written", {"path": "notes.md", "blob": home.blobs.put(notes), "session": 1})
    Loop(home, run).run()  # it moves on to step 6 and finishes
    second = export_mlflow(home, [run], store, EXP)[0]
    want = expected(home, run)
    assert second["mlflow_run_id"] == first["mlflow_run_id"] and second["params_added"] == 0
    assert first["metrics_added"] == first["metric_points"]
    assert second["metrics_added"] == second["metric_points"] - first["metric_points"] > 0, "only the new steps"
    r = mlflow_run(store, run)
    assert r.info.status == "FINISHED" and r.data.tags["rloopd.status"] == "finished"
    for key, points in want.items():
        assert history_of(store, r.info.run_id, key) == points, key
    tsv = Path(client(store).download_artifacts(r.info.run_id, "results.tsv", str(tmp_path))).read_text()
    assert len(tsv.splitlines()) == 1 + 7, "the artifact was replaced by the run's results as they are now"
    assert Path(client(store).download_artifacts(r.info.run_id, "notes.md", str(tmp_path))).read_bytes() == notes
    assert second["artifacts"] == ["curves.png", "ideas.png", "notes.md", "program.md", "results.tsv"]

    fork = fork_run(home, run, 3, experiments=2, name="r2-fork")
    Loop(home, fork).run()
    export_mlflow(home, ["r2-fork", run], store, EXP)
    f = mlflow_run(store, fork)
    assert f.data.params["parent_run"] == run and f.data.params["lineage"] == f"{run}@3 -> {fork}"
    assert [s for s, _ in history_of(store, f.info.run_id, "best_val_bpb")] == list(range(6)), \
        "a fork carries its parent's steps 0..3, then its own 4 and 5"
    assert history_of(store, f.info.run_id, "val_bpb") == expected(home, fork)["val_bpb"]
    assert len(history_of(store, r.info.run_id, "val_bpb")) == 7, "the parent is not touched by the fork's export"


def test_bad_input_is_one_line_and_writes_nothing(home_dir, tmp_path):
    """Checked before mlflow is imported or a store is opened: fast, and needs no mlflow."""
    with Home.open(home_dir) as h:
        run = runs.create_run(h, make_lab(tmp_path), agent="random", experiments=0, budget=None, seed=0, name="r0")
    out = tmp_path / "out"
    out.mkdir()
    p = rloopd("export-mlflow", "r0", "nosuch", "--tracking-uri", f"sqlite:///{out}/mlflow.db", home=home_dir)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"rloopd: error: no run or stream named 'nosuch' in {home_dir.absolute() / 'events.db'}"], p.stderr
    missing = f"sqlite:///{tmp_path}/missing/mlflow.db"
    p = rloopd("export-mlflow", "r0", "--tracking-uri", missing, home=home_dir)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"rloopd: error: --tracking-uri {missing}: directory {tmp_path}/missing does not exist (create it first)"]
    not_a_db = out / "notes.txt"
    not_a_db.write_text("not a database\n")
    with Home.open(home_dir, create=False) as h:
        for target, words in [(f"sqlite:///{not_a_db}", "is not an SQLite database"),
                              (f"sqlite:///{out}", "is not a file"), ("sqlite:///:memory:", "in-memory")]:
            with pytest.raises(TrackerError, match=words) as e:
                export_mlflow(h, [run], target, EXP)
            assert str(e.value).startswith(f"--tracking-uri {target}: ")
    assert not (tmp_path / "missing").exists() and not_a_db.read_text() == "not a database\n"
    assert [x.name for x in out.iterdir()] == ["notes.txt"], "nothing written"
    # the optional extra stays out of every other command: the CLI's modules never import mlflow
    code = "import sys; from rloopd.cli import app; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_store_failing_mid_export_is_one_line_naming_the_run(home_dir, tmp_path, monkeypatch, capsys):
    """MLflow errors after the store opened (a server's 5xx here) are one line and a non-zero exit, not a
    traceback. A stand-in client: no store is made, so this runs in `make test`."""
    need_mlflow()
    from mlflow.exceptions import MlflowException

    from rloopd import export_tracker
    from rloopd.cli import main

    class Failing:
        def get_experiment_by_name(self, name):
            return SimpleNamespace(lifecycle_stage="active", experiment_id="1")

        def search_runs(self, *args, **kwargs):
            raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/search failed with error code "
                                  "503 != 200. Response body: 'upstream down'\nmore detail")

    with Home.open(home_dir) as h:
        run = runs.create_run(h, make_lab(tmp_path), agent="random", experiments=0, budget=None, seed=0, name="r0")
    monkeypatch.setattr(export_tracker, "open_mlflow", lambda uri: Failing())
    monkeypatch.setattr(sys, "argv", ["rloopd", "export-mlflow", "r0", "--home", str(home_dir),
                                      "--tracking-uri", "http://127.0.0.1:1"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rloopd: error: run {run}: API request to endpoint /api/2.0/mlflow/runs/search failed with error code "
        "503 != 200. Response body: 'upstream down'; exporting again resumes"]
