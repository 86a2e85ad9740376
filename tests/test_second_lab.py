"""A second lab that is not a GPT (tests/labs/mlp: an MLP classifier scored by val_accuracy, maximize), end to
end: its own experiment, the loop with the random agent, a daemon, and a report, each showing the metric
under its own name and direction. Nothing here may lean on val_bpb or minimize."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.audit import audit
from rloopd.home import Home
from rloopd.lab import load_lab
from rloopd.loop import Loop
from rloopd.report import build_report

from .conftest import rloopd
from .daemon_helpers import Served

MLP = Path(__file__).parent / "labs" / "mlp"
METRIC, HIDDEN_METRIC = "val_accuracy", "test_accuracy"


def running_max(values: list[float | None]) -> list[float | None]:
    out, best = [], None
    for v in values:
        best = v if best is None or (v is not None and v > best) else best
        out.append(best)
    return out


def experiment(lab: Path, tmp: Path, name: str, *args: str) -> subprocess.Popen:
    """The lab's entry point started as the runner starts it (with a secrets file instead of a pipe)."""
    return subprocess.Popen([sys.executable, str(lab / "frozen" / "experiment.py"), "--workspace",
                             str(lab / "workspace"), "--result", str(tmp / f"{name}.json"), "--scratch", str(tmp),
                             "--log", str(tmp / f"{name}.log"), "--sandbox", "", "--cache", str(tmp / "cache"),
                             "--warm-start", str(tmp / "none.pt"), *args])


def test_the_experiment_trains_is_deterministic_and_reports_its_own_metric(tmp_path):
    lab = load_lab(MLP)
    assert (lab.metric.name, lab.metric.direction, lab.budget) == (METRIC, "maximize", "steps:200")
    assert set(lab.params) == {"LEARNING_RATE", "HIDDEN", "DEPTH", "BATCH_SIZE", "WEIGHT_DECAY"}
    assert set(lab.with_space("hparams").params_in_space()) == set(lab.params)  # the constants' region
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"data_seed": 7, "test_secret": "s3cret"}))
    broken = tmp_path / "broken"
    shutil.copytree(MLP, broken)
    train = broken / "workspace" / "train.py"
    train.write_text(train.read_text().replace("    return model\n", "    return model.hidden\n"))  # no logits
    procs = {name: experiment(root, tmp_path, name, "--seed", "3", "--secrets-file", str(secrets), *extra)
             for name, root, extra in (("a", MLP, ["--save-model", str(tmp_path / "model.pt")]), ("b", MLP, []),
                                       ("broken", broken, []))}
    assert all(p.wait(timeout=60) == 0 for p in procs.values())
    a, b, bad = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b", "broken"))
    assert a["status"] == "ok" and a["sealed"] is True, (tmp_path / "a.log").read_text()
    assert 0.4 < a[METRIC] <= 1.0 and 0.4 < a[HIDDEN_METRIC] <= 1.0  # chance is about 0.25
    assert (a["train_steps"], a["train_examples"]) == (200, 200 * 64) and a["params"] > 0
    assert a["warm_started"] is False  # --warm-start is accepted and not used
    for key in (METRIC, HIDDEN_METRIC, "train_steps", "params"):
        assert a[key] == b[key], key  # same seed, same secrets: the same numbers
    assert (tmp_path / "model.pt").stat().st_size > 0 and not (tmp_path / "b.pt").exists()
    assert bad["status"] == "invalid" and bad[METRIC] is None and bad["train_steps"] == 200
    assert "train_loss:" in (tmp_path / "a.log").read_text()  # the child's output goes to the log only
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("rloop-mlp-")]  # the scratch root is gone


@pytest.fixture(scope="module")
def mlp_home(tmp_path_factory) -> dict:
    """One home: a run of the mlp lab through the loop (random agent, in this process), then one through a
    daemon (`rloopd run` hands it over and follows it)."""
    tmp = tmp_path_factory.mktemp("mlp")
    lab = tmp / "lab"
    shutil.copytree(MLP, lab)
    home_dir = tmp / "home"
    with Home.open(home_dir) as home:
        looped = runs.create_run(home, lab, agent="random", experiments=3, budget=None, seed=1, name="looped")
        Loop(home, looped).run()
    served = Served(home_dir, "--cpu-slots", "1").start()
    try:
        proc = rloopd("run", "--lab", str(lab), "-n", "2", "--seed", "2", "--name", "served", "--json",
                      home=home_dir, timeout=120, check=True)
    finally:
        served.close()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"home": home_dir, "lab": lab, "looped": looped, "served": summary["run_id"], "summary": summary,
            "tmp": tmp}


def values(home: Home, run: str) -> list[tuple[int, str, float | None]]:
    return [(e.data["step"], e.data["status"], e.data["metrics"].get(METRIC))
            for e in home.log.read(run, types=["experiment.finished"])]


def test_the_loop_accepts_higher_accuracy(mlp_home):
    with Home.open(mlp_home["home"], create=False) as home:
        run = mlp_home["looped"]
        created = next(home.log.read(run)).data
        assert (created["metric"], created["direction"]) == (METRIC, "maximize")
        finished = values(home, run)
        assert [s for s, _, _ in finished] == [0, 1, 2, 3] and all(st == "ok" for _, st, _ in finished)
        best = None
        for (step, _, value), d in zip(finished, [e.data for e in home.log.read(run, types=["experiment.decided"])],
                                       strict=True):
            assert d["step"] == step and d["accepted"] == (best is None or value > best), (step, value, best)
            best = value if d["accepted"] else best
            assert d["best_after"] == best
        assert audit(home.log, home.blobs).ok
        tsv = (home.run_dir(run) / "memory" / "results.tsv").read_text().splitlines()
        assert tsv[0].split("\t") == ["step", "commit", METRIC, "status", "accepted", "description"]
        assert len(tsv) == 5 and HIDDEN_METRIC not in "\n".join(tsv)
    rows = {r["run_id"]: r for r in json.loads(rloopd("status", "--json", home=mlp_home["home"], check=True).stdout)}
    assert rows[run]["metric"] == METRIC and rows[run]["best"] == best == max(v for _, _, v in finished)
    shown = json.loads(rloopd("show", run, "1", "--json", home=mlp_home["home"], check=True).stdout)
    assert set(shown["metrics"]) >= {METRIC, HIDDEN_METRIC, "train_steps", "params"}
    decision = shown["decision"]
    assert decision["accepted"] == (shown["metrics"][METRIC] > decision["best_before"])
    text = rloopd("show", run, "1", home=mlp_home["home"], check=True).stdout
    assert f"{METRIC}: " in text and "bpb" not in text
    replayed = json.loads(rloopd("replay", run, "--reexecute", "1", "--json", home=mlp_home["home"]).stdout)
    [again] = replayed["reexecuted"]  # a step budget on CPU: the same number, bit for bit
    assert replayed["ok"] and again["reproduced"] and again["measured"] == again["recorded"] == finished[1][2]


def test_a_daemon_runs_the_lab_to_the_end(mlp_home):
    s = mlp_home["summary"]
    assert (s["status"], s["metric"], s["direction"], s["experiments"]) == ("finished", METRIC, "maximize", 2)
    assert s["floor"] is None  # this lab reports no floor
    with Home.open(mlp_home["home"], create=False) as home:
        finished = values(home, s["run_id"])
        assert [st for _, st, _ in finished] == ["ok"] * 3
        assert s["best"] == max(v for _, _, v in finished)
        assert next(home.log.read(s["run_id"])).data["direction"] == "maximize"


def test_the_report_uses_the_labs_metric_and_direction(mlp_home):
    out = mlp_home["tmp"] / "report"
    runs_ = [mlp_home["looped"], mlp_home["served"]]
    proc = rloopd("report", *runs_, "-o", str(out), "--json", home=mlp_home["home"], check=True)
    summary = json.loads(proc.stdout)["summary"]
    assert (summary["metric"], summary["direction"]) == (METRIC, "maximize")
    [cond] = summary["conditions"].values()
    with Home.open(mlp_home["home"], create=False) as home:
        finals = {r: max(v for _, st, v in values(home, r) if st == "ok") for r in runs_}
        report = build_report(home.log, runs=runs_)
        for rec in report.records:  # best-so-far is the running maximum of the accepted values
            by_step = {step: v for step, st, v in values(home, rec.run)}
            assert rec.curve == running_max([by_step[s] for s in range(len(rec.curve))])
    top = max(finals, key=finals.get)
    assert cond["best_run"]["run"] == top and cond["best_run"]["value"] == finals[top]
    for band in cond["curve"]:  # over the runs that decided the step
        at = [r.curve[band["step"]] for r in report.records if band["step"] < len(r.curve)]
        assert band["median"] == pytest.approx(statistics.median(at)) and band["runs"] == len(at)
    assert sorted(cond["final_best"]) == sorted(finals.values())
    page = (out / "report.html").read_text()
    words = re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", page)  # a figure's bytes may spell anything
    assert "<code>val_accuracy</code> (maximize)" in page and "bpb" not in words
    text = rloopd("report", *runs_, "-o", str(mlp_home["tmp"] / "again"), home=mlp_home["home"], check=True).stdout
    assert "val_accuracy (maximize)" in text
