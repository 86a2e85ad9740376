"""rloopd archive and rloopd gc: housekeeping that leaves every run verifiable."""

from __future__ import annotations

import json
import os
import time

import pytest

from rloopd import runs
from rloopd.fork import fork_run
from rloopd.loop import Loop
from rloopd.replay import replay

from .conftest import rloopd
from .daemon_helpers import Served, make_lab


def checkpoints(home, run):
    return [e.data["blob"] for e in home.log.read(run, types=["checkpoint.saved"])]


@pytest.fixture
def improving(home, tmp_path):
    """A run that accepts many changes (the instant lab scores DEPTH; random search moves it), so it saves
    many checkpoints."""
    for seed in range(20):
        run = runs.create_run(home, make_lab(tmp_path, f"lab{seed}"), agent="random", experiments=10, budget=None,
                              seed=seed, name=f"r{seed}")
        Loop(home, run).run()
        if len(checkpoints(home, run)) >= 4:
            return run
    pytest.fail("no seed gave a run with 4 checkpoints")


def test_archive_hides_a_finished_run_and_keeps_it_verifiable(home, improving):
    proc = rloopd("archive", improving, "--reason", "done", "--json", home=home.path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"run_id": improving, "status": "archived"}
    listed = json.loads(rloopd("status", "--json", home=home.path).stdout)
    assert improving not in [r["run_id"] for r in listed]
    everything = json.loads(rloopd("status", "--all", "--json", home=home.path).stdout)
    assert {r["run_id"]: r["status"] for r in everything}[improving] == "archived"
    assert rloopd("archive", improving, home=home.path).returncode == 0  # again: nothing new
    assert len(list(home.log.read(improving, types=["run.archived"]))) == 1
    assert rloopd("audit", home=home.path).returncode == 0
    assert rloopd("replay", improving, home=home.path).returncode == 0


def test_a_live_or_unknown_run_is_not_archived(home, tmp_path):
    run = runs.create_run(home, make_lab(tmp_path), agent="random", experiments=1, budget=None, seed=0, name="new")
    before = len(list(home.log.read()))
    proc = rloopd("archive", run, home=home.path)
    assert proc.returncode == 2 and "is running: only a finished, stopped or failed run" in proc.stderr
    proc = rloopd("archive", "nosuchrun", home=home.path)
    assert proc.returncode == 2 and "nosuchrun" in proc.stderr
    assert len(list(home.log.read())) == before


def test_gc_keeps_best_and_last_k_and_audit_still_passes(home, improving, tmp_path):
    saved = checkpoints(home, improving)
    best = [e.data for e in home.log.read(improving, types=["checkpoint.saved"])][-1]["blob"]
    orphan_old, orphan_young = home.blobs.put(b"never named, old"), home.blobs.put(b"never named, young")
    os.utime(home.blobs.path(orphan_old), (time.time() - 7200,) * 2)
    named = {e.data["log_blob"] for e in home.log.read(improving, types=["experiment.finished"])}
    named |= {e.data["diff_blob"] for e in home.log.read(improving, types=["experiment.started"])}
    named |= {m["blob"] for m in next(home.log.read(improving)).data["manifest"] if m.get("blob")}

    dry = json.loads(rloopd("gc", "--keep-last", "1", "--dry-run", "--json", home=home.path).stdout)
    assert dry["dry_run"] and dry["removed"] == len(saved) - 1 + 1  # all but the newest checkpoint, one orphan
    assert all(home.blobs.exists(b) for b in saved) and not list(home.log.read("home", types=["blobs.collected"]))

    proc = rloopd("gc", "--keep-last", "1", "--json", home=home.path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["checkpoints"] == len(saved) - 1 and result["orphans"] == 1 and result["bytes_freed"] > 0
    assert home.blobs.exists(best) and home.blobs.exists(orphan_young) and not home.blobs.exists(orphan_old)
    assert [b for b in saved if home.blobs.exists(b)] == [best]
    assert all(home.blobs.exists(b) for b in named)  # frozen files, diffs and logs are never removed
    [collected] = [e.data for e in home.log.read("home", types=["blobs.collected"])]
    assert set(collected["removed"]) == set(saved[:-1]) | {orphan_old} and "last 1" in collected["rule"]
    assert rloopd("audit", home=home.path).returncode == 0
    assert replay(home, improving).ok
    # A fork from a step whose checkpoint was collected starts without one, and replays clean.
    first_accept = next(e.data["step"] for e in home.log.read(improving, types=["experiment.decided"])
                        if e.data["accepted"] and e.data["step"] >= 1)
    fork = fork_run(home, improving, first_accept, experiments=1)
    Loop(home, fork).run()
    assert replay(home, fork).ok, replay(home, fork).divergences
    # A blob lost without a record is still a finding.
    home.blobs.path(best).unlink()
    proc = rloopd("audit", home=home.path)
    assert proc.returncode == 1 and best in proc.stderr


def test_gc_of_an_archived_run_keeps_only_its_best(home, improving):
    rloopd("archive", improving, home=home.path, check=True)
    result = json.loads(rloopd("gc", "--json", home=home.path, check=True).stdout)
    assert result["checkpoints"] == len(checkpoints(home, improving)) - 1
    assert rloopd("audit", home=home.path).returncode == 0 and replay(home, improving).ok


def test_gc_and_archive_go_through_a_serving_daemon(home_dir, tmp_path):
    served = Served(home_dir).start()
    try:
        proc = rloopd("run", "--lab", str(make_lab(tmp_path)), "-n", "2", "--json", home=home_dir)
        run = json.loads(proc.stdout)["run_id"]
        assert rloopd("archive", run, home=home_dir).returncode == 0
        proc = rloopd("gc", "--json", home=home_dir)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["dry_run"] is False
    finally:
        served.close()
    assert rloopd("audit", home=home_dir).returncode == 0


@pytest.mark.parametrize("args, words", [(["--keep-last", "-1"], "--keep-last -1"),
                                         (["--orphan-age", "-5"], "--orphan-age -5")])
def test_gc_bad_options(home, improving, args, words):
    proc = rloopd("gc", *args, home=home.path)
    assert proc.returncode == 2 and words in proc.stderr
    assert not list(home.log.read("home", types=["blobs.collected"]))


def test_a_checkpoint_offered_to_a_warm_start_is_still_collected_by_retention(home, tmp_path):
    """experiment.started names the checkpoint it offered (warm_start_blob); that must not pin it forever."""
    for seed in range(20):
        lab = make_lab(tmp_path, f"warm{seed}")
        toml = lab / "rloop.toml"
        toml.write_text(toml.read_text().replace('source = "synthetic"', 'source = "synthetic"\nwarm_start = true'))
        run = runs.create_run(home, lab, agent="random", experiments=10, budget=None, seed=seed, name=f"w{seed}")
        Loop(home, run).run()
        saved = checkpoints(home, run)
        if len(saved) >= 3:
            break
    offered = {e.data["warm_start_blob"] for e in home.log.read(run, types=["experiment.started"])} - {None}
    assert offered and offered <= set(saved)
    rloopd("archive", run, home=home.path, check=True)
    result = json.loads(rloopd("gc", "--json", home=home.path, check=True).stdout)
    assert result["checkpoints"] == len(saved) - 1  # the best stays, the others go, offered or not
    assert rloopd("audit", home=home.path).returncode == 0 and replay(home, run).ok
