"""The acceptance rule `rerun:K`: winners are re-run as replicas 1..K with other seeds and kept only when the
mean holds; crashes between and during replicas resume; and `rloopd noise` measures a lab's rerun noise."""

from __future__ import annotations

import collections
import json
import statistics
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.decide import decide, decide_replicas, parse_rule, rerun_count
from rloopd.errors import LabConfigError
from rloopd.home import Home
from rloopd.lab import load_lab
from rloopd.log import NewEvent
from rloopd.loop import Loop
from rloopd.memory.state import fold
from rloopd.views import step_detail

from .conftest import rloopd
from .daemon_helpers import Served, detach, events, make_lab, state, wait_for


def noisy_lab(tmp: Path, accept: str | None = "rerun:2", offsets: dict[int, float] | None = None,
              name: str = "lab", **constants) -> Path:
    """The instant lab whose metric moves with the training seed: frozen/offsets.json maps a seed to what
    is added to the metric (0 for any other seed)."""
    lab = make_lab(tmp, name, **constants)
    entry = lab / "frozen" / "experiment.py"
    text = entry.read_text()
    anchor = "value = surface.score(consts)\n"
    assert anchor in text
    entry.write_text(text.replace(anchor, anchor + (
        "_offsets = Path(__file__).parent / 'offsets.json'\n"
        "if _offsets.exists():\n"
        "    value += json.loads(_offsets.read_text()).get(str(a.seed), 0.0)\n")))
    (lab / "frozen" / "offsets.json").write_text(json.dumps({str(k): v for k, v in (offsets or {}).items()}))
    if accept:
        toml = lab / "rloop.toml"
        toml.write_text(toml.read_text().replace('source = "synthetic"\n', f'source = "synthetic"\naccept = "{accept}"\n'))
    return lab


def seed_of(seed: int, step: int, replica: int) -> int:
    return runs.experiment_seed({"seed": seed}, step, replica)


def start(home: Home, lab: Path, n: int, seed: int = 0, agent: str = "random") -> str:
    return runs.create_run(home, lab, agent=agent, experiments=n, budget=None, seed=seed, name=None)


def of_type(home: Home, run: str, type_: str) -> list[dict]:
    return [e.data for e in home.log.read(run, types=[type_])]


# --- the rule ----------------------------------------------------------------------------------------


def test_the_rule_parses_and_bad_ones_are_refused(tmp_path):
    assert parse_rule("rerun:3") == 0.0 and rerun_count("rerun:3") == 3 and rerun_count("margin:0.1") == 0
    assert decide(2.0, "ok", 1.9, "minimize", "rerun:2").accepted  # the gate on replica 0 is `better`
    for bad in ("rerun:0", "rerun:x", "rerun:101", "rerun:-1", "rerun:"):
        assert rerun_count(bad) == 0
        with pytest.raises(LabConfigError, match="acceptance rule"):
            parse_rule(bad)
        lab = noisy_lab(tmp_path, accept=bad, name=f"lab{bad.replace(':', '')}")
        with pytest.raises(LabConfigError, match=r"accept.*rerun:K"):
            load_lab(lab)
    assert load_lab(noisy_lab(tmp_path, accept="rerun:2", name="good")).accept == "rerun:2"


def test_decide_replicas_is_pure_and_keeps_only_a_winning_mean():
    d = decide_replicas(2.0, [("ok", 1.7), ("ok", 2.2), ("ok", 2.3)], "minimize")
    assert not d.accepted and d.best_after == 2.0 and d.mean == pytest.approx(6.2 / 3) and "not better" in d.reason
    d = decide_replicas(2.0, [("ok", 1.7), ("ok", 1.9), ("ok", 1.95)], "minimize")
    assert d.accepted and d.best_after == d.mean == pytest.approx(1.85) and d.replicas == (1.7, 1.9, 1.95)
    d = decide_replicas(0.5, [("ok", 0.7), ("ok", 0.4), ("ok", 0.35)], "maximize")
    assert not d.accepted and d.best_after == 0.5
    d = decide_replicas(2.0, [("ok", 1.0), ("crashed", None), ("ok", 1.0)], "minimize")
    assert not d.accepted and "replica 1" in d.reason and "crashed" in d.reason and d.mean is None
    d = decide_replicas(None, [("ok", 1.9), ("ok", 1.9), ("ok", 1.9)], "minimize")
    assert d.accepted and d.best_after == 1.9 and "first valid result" in d.reason


# --- the loop ----------------------------------------------------------------------------------------


def test_winners_are_rerun_with_other_seeds_and_kept_when_the_mean_holds(home, tmp_path):
    lab = noisy_lab(tmp_path)  # no offsets: every replica repeats replica 0's value
    run = start(home, lab, n=6, seed=3)
    final = Loop(home, run).run()
    assert final.status == "finished" and final.experiments == 6 and final.valid == 6, "replicas are no experiments"
    finished = collections.defaultdict(list)
    for f in of_type(home, run, "experiment.finished"):
        finished[f["step"]].append((f["replica"], f["status"], f["metrics"]["val_bpb"]))
    started = of_type(home, run, "experiment.started")
    best = None
    for d in of_type(home, run, "experiment.decided"):
        first = finished[d["step"]][0][2]
        won = best is None or first < best
        if won:  # replicas 1 and 2 ran, the same change, before the decision
            assert [r for r, _, _ in finished[d["step"]]] == [0, 1, 2]
            assert d["accepted"] and d["replicas"] == [first] * 3 and d["mean"] == first and d["best_after"] == first
            same = [s for s in started if s["step"] == d["step"]]
            assert len({s["commit"] for s in same}) == 1 and len({s["description"] for s in same}) == 1
            best = first
        else:
            assert finished[d["step"]] == [(0, "ok", first)] and not d["accepted"] and d["replicas"] == []
    assert final.best == best and final.accepted == sum(d["accepted"] for d in of_type(home, run, "experiment.decided")) - 1
    assert len(finished[0]) == 3, "the baseline is the first winner: its best is a mean too"
    tsv = (home.run_dir(run) / "memory" / "results.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 7, "results.tsv has the proposals only"
    detail = step_detail(home, run, 0)
    assert detail["metrics"]["val_bpb"] == 1.9 and detail["decision"]["replicas"] == [1.9] * 3
    assert home.snapshots.tree_equal(final.best_commit, home.run_dir(run) / "workspace")


def test_a_lucky_first_run_that_does_not_hold_up_is_rejected(home, tmp_path):
    # step 1's first run is lucky by far, its replicas unlucky: its mean loses. Step 2 wins in every run.
    offsets = {seed_of(9, 1, 0): -10.0, seed_of(9, 1, 1): 10.0, seed_of(9, 1, 2): 10.0,
               seed_of(9, 2, 0): -5.0, seed_of(9, 2, 1): -4.0, seed_of(9, 2, 2): -4.0}
    assert len(set(offsets)) == 6
    lab = noisy_lab(tmp_path, offsets=offsets)
    run = start(home, lab, n=2, seed=9)
    final = Loop(home, run).run()
    d0, d1, d2 = of_type(home, run, "experiment.decided")
    assert d0["accepted"] and d0["best_after"] == 1.9
    v1 = d1["replicas"][0]
    assert not d1["accepted"] and d1["best_after"] == 1.9 and d1["mean"] == pytest.approx((3 * v1 + 40) / 3)
    assert d1["replicas"][1] == pytest.approx(v1 + 20) and "mean of 3 runs" in d1["reason"]
    assert d2["accepted"] and d2["best_after"] == d2["mean"] == pytest.approx(sum(d2["replicas"]) / 3)
    assert final.best == d2["mean"] and final.best_step == 2 and final.accepted == 1
    assert final.checkpoint_blob is not None


def _step0(home: Home, run: str, *events_: tuple[str, dict]) -> None:
    base = fold(list(home.log.read(run))).base_commit
    home.log.append(run, [NewEvent(t, {"step": 0, "commit": base, **d} if t == "experiment.started" else
                                   {"step": 0, **d}) for t, d in events_])


def finishes(home: Home, run: str, step: int = 0) -> list[tuple]:
    return [(f["replica"], f["attempt"], f["status"]) for f in of_type(home, run, "experiment.finished")
            if f["step"] == step]


def test_a_crash_during_a_replica_resumes_with_its_next_attempt(home, tmp_path):
    run = start(home, noisy_lab(tmp_path), n=1)
    ok = {"status": "ok", "metrics": {"val_bpb": 1.9}}
    _step0(home, run, ("experiment.started", {}), ("experiment.finished", ok),
           ("experiment.started", {"replica": 1}))  # the process died with replica 1 in flight
    final = Loop(home, run).run()
    assert finishes(home, run) == [(0, 0, "ok"), (1, 0, "interrupted"), (1, 1, "ok"), (2, 0, "ok")]
    retried = [s for s in of_type(home, run, "experiment.started") if s["step"] == 0 and s["replica"] == 1]
    assert [s["attempt"] for s in retried] == [0, 1] and retried[0]["commit"] == retried[1]["commit"]
    [d0] = [d for d in of_type(home, run, "experiment.decided") if d["step"] == 0]
    assert d0["accepted"] and d0["replicas"] == [1.9, 1.9, 1.9]
    assert final.status == "finished" and final.experiments == 1


def test_a_crash_between_replicas_runs_the_missing_ones_then_decides(home, tmp_path):
    run = start(home, noisy_lab(tmp_path), n=1)
    ok = {"status": "ok", "metrics": {"val_bpb": 1.9}}
    _step0(home, run, ("experiment.started", {}), ("experiment.finished", ok),
           ("experiment.started", {"replica": 1}), ("experiment.finished", {"replica": 1, **ok}))
    final = Loop(home, run).run()
    assert finishes(home, run) == [(0, 0, "ok"), (1, 0, "ok"), (2, 0, "ok")]
    decided = of_type(home, run, "experiment.decided")
    assert [d["step"] for d in decided] == [0, 1] and decided[0]["replicas"] == [1.9] * 3
    assert final.status == "finished" and home.snapshots.tree_equal(final.best_commit, home.run_dir(run) / "workspace")


def test_a_crash_between_a_finish_and_its_decision_is_decided_on_resume(home, tmp_path):
    run = start(home, noisy_lab(tmp_path, accept=None), n=1)  # plain `better`
    _step0(home, run, ("experiment.started", {}), ("experiment.finished", {"status": "ok", "metrics": {"val_bpb": 1.9}}))
    final = Loop(home, run).run()
    assert finishes(home, run) == [(0, 0, "ok")]
    decided = of_type(home, run, "experiment.decided")
    assert [(d["step"], d["accepted"]) for d in decided][:1] == [(0, True)] and len(decided) == 2
    assert final.best_step in (0, 1) and final.experiments == 1


@pytest.mark.timeout(240)
def test_sigkill_while_replicas_run_then_restart(tmp_path):
    from .test_recovery import check_consistent

    home = tmp_path / "home"
    lab = noisy_lab(tmp_path, SLEEP=0.2)
    d = Served(home, "--cpu-slots", "1").start()
    run = detach(home, lab, "-n", "6", "--seed", "2")
    kills = 0
    try:
        for _ in range(2):  # kill while a replica is in flight, twice
            def replica_in_flight() -> bool:
                s = state(home, run)
                return s.status != "running" or (s.in_flight is not None and s.in_flight.replica > 0)
            wait_for(replica_in_flight, timeout=60, what="a replica in flight")
            if state(home, run).status != "running":
                break
            d.kill()
            kills += 1
            d = Served(home, "--cpu-slots", "1").start()
        wait_for(lambda: state(home, run).status == "finished", timeout=120, what="the run to finish")
    finally:
        d.close()
    assert kills >= 1
    check_consistent(home, [run])
    evs = events(home, run)
    interrupted = [e["data"] for e in evs if e["type"] == "experiment.finished" and e["data"]["status"] == "interrupted"]
    assert any(i["replica"] > 0 for i in interrupted), "a replica was interrupted and started again"
    decided = collections.Counter(e["data"]["step"] for e in evs if e["type"] == "experiment.decided")
    assert set(decided) == set(range(7)) and set(decided.values()) == {1}, "every step decided once"
    real = collections.Counter((e["data"]["step"], e["data"]["replica"]) for e in evs
                               if e["type"] == "experiment.finished" and e["data"]["status"] != "interrupted")
    for e in evs:
        if e["type"] == "experiment.decided" and e["data"]["replicas"]:
            assert all(real[(e["data"]["step"], r)] == 1 for r in range(3))
    assert state(home, run).experiments == 6


# --- rloopd noise ------------------------------------------------------------------------------------


def test_noise_reports_the_spread_over_seeds(tmp_path):
    offsets = {seed_of(0, 0, i): off for i, off in enumerate([0.0, 0.01, -0.02, 0.03])}
    lab = noisy_lab(tmp_path, accept=None, offsets=offsets)
    proc = rloopd("noise", str(lab), "--repeats", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    values = [round(1.9 + o, 6) for o in offsets.values()]
    assert got["values"] == values and got["seeds"] == list(offsets) and got["statuses"] == ["ok"] * 4
    assert got["mean"] == pytest.approx(statistics.fmean(values)) and got["std"] == pytest.approx(statistics.stdev(values))
    assert got["min"] == min(values) and got["max"] == max(values)
    assert got["suggested_margin"] == float(f"{2 * statistics.stdev(values):.2g}")
    assert got["suggested_accept"] == f"margin:{got['suggested_margin']:g}"
    assert not list(tmp_path.glob("**/events.db")), "no home is written"
    human = rloopd("noise", str(lab), "-n", "3")
    assert human.returncode == 0 and "3 of 3 runs completed" in human.stdout and "suggested margin" in human.stdout
    mean = statistics.fmean(values[:3])
    assert f"mean {mean:.6g}  sd {statistics.stdev(values[:3]):.6g}  min 1.88  max 1.91" in human.stdout, human.stdout


def test_noise_of_a_deterministic_lab_and_bad_input(tmp_path):
    lab = make_lab(tmp_path)
    got = json.loads(rloopd("noise", str(lab), "-n", "2", "--json", check=True).stdout)
    assert got["mean"] == 1.9 and got["std"] == 0.0 and got["suggested_accept"] == "better"
    for args, word in ((["-n", "1"], "--repeats"), (["--budget", "0"], "--budget")):
        proc = rloopd("noise", str(lab), *args)
        assert proc.returncode == 2 and word in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = rloopd("noise", str(tmp_path / "nowhere"))
    assert proc.returncode == 2 and "nowhere: no such file" in proc.stderr


def test_noise_counts_failures_apart(tmp_path):
    lab = make_lab(tmp_path, STATUS="crashed")
    proc = rloopd("noise", str(lab), "-n", "2", "--json")
    got = json.loads(proc.stdout)
    assert proc.returncode == 1 and got["statuses"] == ["crashed", "crashed"] and got["ok"] == 0 and got["mean"] is None


def test_replicas_of_an_optuna_suggestion_carry_it(home, tmp_path):
    run = start(home, noisy_lab(tmp_path, accept="rerun:1"), n=4, seed=2, agent="optuna:tpe")
    final = Loop(home, run).run()
    assert final.status == "finished" and final.experiments == 4
    by_step = collections.defaultdict(dict)
    for s in of_type(home, run, "experiment.started"):
        by_step[s["step"]][s["replica"]] = s
    assert sum(1 in reps for step, reps in by_step.items() if step >= 1) == 2 == final.accepted
    for reps in by_step.values():
        if 1 in reps:
            keys = ("commit", "params", "description", "category", "suggested_by", "study", "diff_blob")
            assert {k: reps[1][k] for k in keys} == {k: reps[0][k] for k in keys}
