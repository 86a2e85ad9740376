"""Forks: a new run whose history is its parent's prefix plus its own events, nothing copied."""

from __future__ import annotations

import json

import pytest

from rloopd import runs
from rloopd.audit import audit
from rloopd.errors import StepNotFound
from rloopd.fork import fork_point, fork_run
from rloopd.history import history, lineage, run_state
from rloopd.loop import Loop

from .conftest import rloopd
from .daemon_helpers import Served, detach, make_lab, state, wait_for


@pytest.fixture
def parent(home, tmp_path):
    lab = make_lab(tmp_path)
    run = runs.create_run(home, lab, agent="random", experiments=8, budget=None, seed=4, name="parent")
    Loop(home, run).run()
    return run


def decided(home, run):
    return {e.data["step"]: e.data for e in history(home.log, run) if e.type == "experiment.decided"}


def test_fork_at_accepted_and_rejected_steps(home, parent):
    d = decided(home, parent)
    accepted = max(s for s, x in d.items() if x["accepted"] and s < 8)
    rejected = max(s for s, x in d.items() if not x["accepted"] and s < 8)
    parent_events = list(home.log.read(parent))
    for step in (accepted, rejected):
        fork = fork_run(home, "parent", step, experiments=2)
        created = next(home.log.read(fork)).data
        stream, n = fork_point(home, parent, step)
        assert created["parent"] == {"run": parent, "n": n, "step": step}
        best_as_of = run_state(home.log, parent, until_n=n).best_commit
        assert created["base_commit"] == best_as_of, "the fork starts at the best commit as of STEP"
        assert home.snapshots.tree_equal(best_as_of, home.run_dir(fork) / "workspace")
        st = Loop(home, fork).run()
        own = [e for e in home.log.read(fork) if e.type == "experiment.started"]
        assert [e.data["step"] for e in own] == [step + 1, step + 2], "no baseline; numbering continues"
        assert st.experiments == step + 2 and st.status == "finished"
        tsv = (home.run_dir(fork) / "memory" / "results.tsv").read_text().splitlines()
        assert [line.split("\t")[0] for line in tsv[1:]] == [str(s) for s in range(step + 3)]
        assert next(home.log.read(fork)).prev == home.log.conn.execute(
            "SELECT hash FROM events WHERE stream = ? AND n = ?", (parent, n)).fetchone()[0]
    assert list(home.log.read(parent)) == parent_events, "the parent is untouched"
    assert audit(home.log, home.blobs).ok


def test_fork_of_a_fork(home, parent):
    child = fork_run(home, parent, 3, experiments=3, name="child")
    Loop(home, child).run()
    grandchild = fork_run(home, "child", 5, experiments=1, seed=9)
    Loop(home, grandchild).run()
    assert [x["run"] for x in lineage(home.log, grandchild)] == [parent, child]
    steps = [e.data["step"] for e in history(home.log, grandchild) if e.type == "experiment.started"]
    assert steps == [0, 1, 2, 3, 4, 5, 6]
    early = fork_run(home, "child", 2, experiments=1)  # a step inside the child's prefix: forks the parent
    assert next(home.log.read(early)).data["parent"]["run"] == parent
    assert audit(home.log, home.blobs).ok
    out = rloopd("status", "--json", home=home.path)
    rows = {r["run_id"]: r for r in json.loads(out.stdout)}
    assert rows[grandchild]["parent"] == {"run": child, "step": 5}
    log = rloopd("log", grandchild, home=home.path)
    assert f"lineage: {parent}@step 3 -> {child}@step 5 -> {grandchild}" in log.stderr


def test_bad_forks(home, parent, tmp_path):
    before = home.log.last_seq()
    with pytest.raises(StepNotFound, match="no step 99"):
        fork_run(home, parent, 99)
    for args, words in ((["fork", parent, "99"], "no step 99"), (["fork", "nope", "1"], "nope"),
                        (["fork", parent, "2", "--agent", "gpt-9"], "--agent"),
                        (["fork", parent, "2", "--program", str(tmp_path / "missing.md")], "--program")):
        proc = rloopd(*args, home=home.path)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert home.log.last_seq() == before


def test_unfinished_step_cannot_be_forked(home, tmp_path):
    run = runs.create_run(home, make_lab(tmp_path, "lab2"), agent="random", experiments=1, budget=None, seed=0,
                          name=None)
    from rloopd.log import NewEvent

    home.log.append(run, [NewEvent("experiment.started", {"step": 0, "commit": state(home.path, run).base_commit})])
    with pytest.raises(StepNotFound, match="has not finished"):
        fork_run(home, run, 0)


def test_forked_run_continued_by_the_daemon(tmp_path):
    home = tmp_path / "home"
    d = Served(home).start()
    try:
        lab = make_lab(tmp_path)
        parent = detach(home, lab, "-n", "4")
        wait_for(lambda: state(home, parent).status == "finished", what="the parent")
        other = tmp_path / "other.md"
        other.write_text("# the fork's own instructions\n")
        out = rloopd("fork", parent, "2", "--experiments", "3", "--program", str(other), "--detach", "--json",
                     home=home)
        fork = json.loads(out.stdout)["run_id"]
        wait_for(lambda: state(home, fork).status == "finished", what="the fork")
        with __import__("rloopd.home", fromlist=["Home"]).Home.open(home, create=False) as h:
            st = run_state(h.log, fork)
            assert st.experiments == 5 and st.program_path == str(other)
            assert (h.run_dir(fork) / "program.md").read_text() == other.read_text()
    finally:
        d.close()
    assert rloopd("audit", home=home).returncode == 0
