"""The optuna agent: specs, suggestions logged and inside the declared space, every sampler, the study rebuilt
from the log after a daemon restart (the same suggestions as an uninterrupted run) and continued by a fork."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.agents import check_agent
from rloopd.agents import optuna_agent as oa
from rloopd.errors import LabConfigError
from rloopd.fork import fork_run
from rloopd.home import Home
from rloopd.lab import Param, load_lab, read_constants
from rloopd.loop import Loop

from .conftest import rloopd
from .daemon_helpers import INSTANT, Served, detach, events, make_lab, state, wait_for


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    dest = tmp_path / "lab"
    shutil.copytree(INSTANT, dest)
    return dest


def start(home: Home, lab: Path, agent: str, n: int, seed: int = 0) -> str:
    return runs.create_run(home, lab, agent=agent, experiments=n, budget=None, seed=seed, name=None)


def started(home: Home, run: str) -> list[dict]:
    return [e.data for e in home.log.read(run, types=["experiment.started"])]


def suggestions(rows: list[dict]) -> dict[int, dict]:
    """step -> the params of its last attempt (replica 0)."""
    return {d["step"]: d["params"] for d in rows if d["step"] >= 1 and d.get("replica", 0) == 0}


def test_specs_and_an_unknown_sampler(home_dir, lab):
    for spec in ("optuna", "optuna:tpe", "optuna:gp", "optuna:cmaes", "optuna:random"):
        assert check_agent(spec) == "optuna"
    assert oa.parse_agent("optuna") == "tpe"
    for bad in ("optuna:bogus", "optuna:", "optuna:TPE"):
        with pytest.raises(LabConfigError, match="unknown optuna sampler.*optuna:tpe, optuna:gp, optuna:cmaes"):
            check_agent(bad)
    proc = rloopd("run", "--lab", str(lab), "--agent", "optuna:bogus", home=home_dir)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--agent" in proc.stderr and "optuna:cmaes" in proc.stderr and "Traceback" not in proc.stderr


def test_suggestions_are_logged_applied_and_inside_the_space(home, lab):
    run = start(home, lab, "optuna:tpe", n=12, seed=4)
    state_ = Loop(home, run).run()
    assert state_.status == "finished" and state_.experiments == 12
    space = load_lab(lab).params
    rows = started(home, run)
    assert rows[0]["step"] == 0 and rows[0]["suggested_by"] is None  # the baseline is no suggestion
    best_values = read_constants((lab / "workspace" / "train.py").read_text())
    for d in rows[1:]:
        assert d["suggested_by"] == "optuna:tpe" and set(d["params"]) == set(space)
        assert all(space[n].contains(v) for n, v in d["params"].items()), d["params"]
        assert isinstance(d["params"]["DEPTH"], int) and d["params"]["WIDTH"] in (32, 64, 128)
        study = d["study"]
        assert study["sampler"] == "tpe" and study["trials"] == d["step"] and study["failed"] == 0
        assert study["seed"] == oa.sampler_seed(4, d["step"], 0)
        # the commit trained is the suggestion applied to the best commit, nothing else
        trained = read_constants(home.snapshots.read(d["commit"], "train.py").decode())
        assert {n: trained[n] for n in space} == d["params"]
        changed = [n for n in sorted(space) if best_values[n] != d["params"][n]]
        assert d["category"] == (space[changed[0]].category if len(changed) == 1 else
                                 "multiple" if changed else None)
        assert d["description"] and all(n in d["description"] for n in changed)
        decided = next(e.data for e in home.log.read(run, types=["experiment.decided"]) if e.data["step"] == d["step"])
        if decided["accepted"]:
            best_values = trained


@pytest.mark.parametrize("sampler,n", [("tpe", 12), ("gp", 11), ("cmaes", 10), ("random", 6)])
def test_each_sampler_suggests_the_same_for_the_same_seed(tmp_path, lab, sampler, n):
    """Two homes, one seed: the same suggestions step by step (GP and TPE past their 10 random startup trials)."""
    got = []
    for i in range(2):
        with Home.open(tmp_path / f"h{i}") as h:
            run = start(h, lab, f"optuna:{sampler}", n=n, seed=7)
            final = Loop(h, run).run()
            assert final.status == "finished" and final.experiments == n and final.valid == n
            rows = started(h, run)
            assert all(d["suggested_by"] == f"optuna:{sampler}" for d in rows[1:])
            got.append(suggestions(rows))
    assert got[0] == got[1] and len(got[0]) == n
    assert len({json.dumps(p, sort_keys=True) for p in got[0].values()}) > 1  # it does explore


def test_history_is_told_with_every_parameter_and_failures():
    params = {"LR": Param(category="learning rate", low=1e-4, high=1e-1, log=True),
              "DEPTH": Param(category="depth", low=1, high=8),
              "WIDTH": Param(category="width", choices=[32, 64, 128])}
    dists = oa.distributions(params, {"LR": 0.01, "DEPTH": 2, "WIDTH": 64})
    at_commit = {"base": {"LR": 0.01, "DEPTH": 2, "WIDTH": 64}, "c1": {"LR": 0.02, "DEPTH": 2, "WIDTH": 64}}
    rows = [
        {"step": 0, "replica": 0, "status": "ok", "value": 1.9, "params": "{}", "commit": "base"},
        {"step": 1, "replica": 0, "status": "ok", "value": 1.8, "params": '{"LR": 0.02}', "commit": "c1"},
        {"step": 1, "replica": 1, "status": "ok", "value": 1.7, "params": '{"LR": 0.02}', "commit": "c1"},
        {"step": 2, "replica": 0, "status": "crashed", "value": None,
         "params": '{"LR": 0.001, "DEPTH": 3, "WIDTH": 128}', "commit": "c2"},
        {"step": 3, "replica": 0, "status": "interrupted", "value": None, "params": "{}", "commit": "c3"},
        {"step": 4, "replica": 0, "status": "ok", "value": 2.0,
         "params": '{"LR": 0.5, "DEPTH": 3, "WIDTH": 128}', "commit": "c4"},  # outside today's range
        {"step": 5, "replica": 0, "status": "ok", "value": 2.0, "params": '{"LR": 0.5}', "commit": "c5"},
    ]
    told = oa.history(rows, dists, 5, lambda c: at_commit.get(c, {}))
    assert told == [oa.Told(0, {"DEPTH": 2, "LR": 0.01, "WIDTH": 64}, 1.9),
                    oa.Told(1, {"DEPTH": 2, "LR": 0.02, "WIDTH": 64}, 1.75),  # rerun: the mean of its replicas
                    oa.Told(2, {"DEPTH": 3, "LR": 0.001, "WIDTH": 128}, None)]
    assert isinstance(dists["DEPTH"], __import__("optuna").distributions.IntDistribution)
    for sampler in oa.SAMPLERS[:1] + oa.SAMPLERS[2:]:  # (gp: see the loop test)
        a = oa.suggest(sampler, dists, told, "minimize", 11)
        assert a == oa.suggest(sampler, dists, told, "minimize", 11)
        assert all(params[k].contains(v) for k, v in a.items())
        assert a["LR"] == float(f"{a['LR']:.4g}")


def test_cmaes_rebuilt_from_the_log_moves_its_distribution():
    """CMA-ES's state is a trajectory: replayed from the told trials it advances generations and closes in."""
    import math

    params = {"A": Param(category="other", low=0.0, high=1.0), "B": Param(category="other", low=0.0, high=1.0)}
    dists = oa.distributions(params, {"A": 0.5, "B": 0.5})
    told: list[oa.Told] = []
    for step in range(70):
        p = oa.suggest("cmaes", dists, told, "minimize", oa.sampler_seed(0, step, 0))
        told.append(oa.Told(step, p, math.hypot(p["A"] - 0.2, p["B"] - 0.7)))
    early, late = [t.value for t in told[1:15]], [t.value for t in told[-14:]]
    assert sum(late) / len(late) < 0.5 * sum(early) / len(early)


@pytest.mark.timeout(240)
def test_a_restarted_daemon_rebuilds_the_study_and_suggests_what_an_uninterrupted_run_does(tmp_path):
    home = tmp_path / "home"
    lab = make_lab(tmp_path, SLEEP=0.25)
    n = 13
    d = Served(home, "--cpu-slots", "2").start()
    try:
        ids = {s: detach(home, lab, "-n", str(n), "--seed", "5", "--agent", f"optuna:{s}") for s in ("tpe", "cmaes")}
        wait_for(lambda: all(state(home, r).step >= 5 for r in ids.values()), what="step 5 of both runs")
        d.kill()
        with Home.open(home, create=False) as h:
            before = {s: [e.as_dict() for e in h.log.read(r)] for s, r in ids.items()}
        d = Served(home, "--cpu-slots", "2").start()
        wait_for(lambda: all(state(home, r).status == "finished" for r in ids.values()), what="the runs to finish")
    finally:
        d.close()
    for sampler, run in ids.items():
        after = [e for e in events(home, run)]
        assert after[:len(before[sampler])] == before[sampler], "what was recorded stays as it was"
        rows = [e["data"] for e in after if e["type"] == "experiment.started"]
        by_attempt = {(r["step"], r["attempt"]): r for r in rows}
        for (step, attempt), r in by_attempt.items():  # a retried attempt reuses its recorded suggestion
            if attempt:
                assert r["params"] == by_attempt[(step, attempt - 1)]["params"] and r["commit"] == by_attempt[(step, attempt - 1)]["commit"]
        kill_at = max(e["data"]["step"] for e in before[sampler] if e["type"] == "experiment.started")
        later = [r for r in rows if r["step"] > kill_at]
        assert later and all(r["suggested_by"] == f"optuna:{sampler}" and r["study"]["trials"] == r["step"]
                             for r in later), "the next suggestions are logged, from the whole history"
        # the same seed and history, uninterrupted, in another home: the very same suggestions
        with Home.open(tmp_path / f"ref-{sampler}") as h:
            ref = start(h, lab, f"optuna:{sampler}", n=n, seed=5)
            Loop(h, ref).run()
            assert suggestions(started(h, ref)) == suggestions(rows)
        assert state(home, run).experiments == n


def test_a_fork_continues_its_parents_study(home, lab):
    parent = start(home, lab, "optuna:tpe", n=8, seed=3)
    Loop(home, parent).run()
    fork = fork_run(home, parent, 4, experiments=4)
    final = Loop(home, fork).run()
    assert final.status == "finished" and final.experiments == 8
    mine = [d for d in started(home, fork)]
    assert [d["step"] for d in mine] == [5, 6, 7, 8] and all(d["study"]["trials"] == d["step"] for d in mine)
    theirs = suggestions(started(home, parent))
    assert suggestions(mine) == {s: theirs[s] for s in (5, 6, 7, 8)}, "the parent's study, to the step"


def test_a_random_run_forked_into_optuna_tells_its_whole_history(home, lab):
    parent = start(home, lab, "random", n=4, seed=1)
    Loop(home, parent).run()
    fork = fork_run(home, parent, 4, agent="optuna:cmaes", experiments=2)
    Loop(home, fork).run()
    mine = started(home, fork)
    assert [d["step"] for d in mine] == [5, 6]
    # random recorded one constant per step: the others were read from each step's commit
    assert mine[0]["study"] == {"sampler": "cmaes", "seed": oa.sampler_seed(1, 5, 0), "trials": 5, "failed": 0}
    assert set(mine[0]["params"]) == {"LEARNING_RATE", "DEPTH", "WIDTH"}


def test_failed_experiments_are_told_as_failed_trials(home, lab):
    train = lab / "workspace" / "train.py"
    train.write_text(train.read_text().replace('STATUS = "ok"', 'STATUS = "crashed"'))
    run = start(home, lab, "optuna:tpe", n=3)
    t0 = time.monotonic()
    Loop(home, run).run()
    rows = started(home, run)
    assert [d["study"]["failed"] for d in rows[1:]] == [1, 2, 3] and all(d["study"]["trials"] == 0 for d in rows[1:])
    assert time.monotonic() - t0 < 60
