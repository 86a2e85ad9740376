"""rloopd replay: a rebuild from the log agrees with the live projections, and every kind of tampering is named."""

from __future__ import annotations

import json
import sqlite3

import pytest

from rloopd import runs
from rloopd.fork import fork_run
from rloopd.loop import Loop
from rloopd.replay import replay

from .conftest import rloopd
from .daemon_helpers import Served, detach, make_lab, state, wait_for


@pytest.fixture
def finished(home, tmp_path):
    run = runs.create_run(home, make_lab(tmp_path), agent="random", experiments=5, budget=None, seed=2, name="r")
    Loop(home, run).run()
    return run


def test_replay_is_clean_on_a_finished_run_and_a_fork(home, finished):
    assert replay(home, finished).ok, replay(home, finished).divergences
    fork = fork_run(home, finished, 3, experiments=2)
    Loop(home, fork).run()
    report = replay(home, fork)
    assert report.ok, report.divergences
    proc = rloopd("replay", fork, "--json", home=home.path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True


def test_a_changed_projection_is_named(home, finished):
    tsv = home.run_dir(finished) / "memory" / "results.tsv"
    tsv.chmod(0o644)
    tsv.write_text(tsv.read_text().replace("\tno\t", "\tyes\t", 1))
    proc = rloopd("replay", finished, home=home.path)
    assert proc.returncode == 1 and "memory/results.tsv" in proc.stderr and "projection" in proc.stderr


def test_a_changed_table_row_is_named(home, finished):
    home.log.conn.execute("UPDATE experiments SET value = 0.5 WHERE run = ? AND step = 2", (finished,))
    report = replay(home, finished)
    assert report.divergences[0]["field"] == "value" and report.divergences[0]["step"] == 2


def test_an_edited_event_and_a_missing_blob_are_named(home, finished):
    blob = next(e.data["log_blob"] for e in home.log.read(finished, types=["experiment.finished"]))
    home.blobs.path(blob).unlink()
    report = replay(home, finished)
    assert any("missing" in d["what"] for d in report.divergences)
    conn = sqlite3.connect(home.path / "events.db")
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("UPDATE events SET data = replace(data, '\"status\":\"ok\"', '\"status\":\"oom\"') "
                 "WHERE stream = ? AND type = 'experiment.finished' AND n = 6", (finished,))
    conn.commit()
    conn.close()
    report = replay(home, finished)
    assert any(d["kind"] == "event" and d.get("n") == 6 for d in report.divergences)


def test_replay_of_a_live_run_through_the_daemon(tmp_path):
    home = tmp_path / "home"
    d = Served(home).start()
    try:
        run = detach(home, make_lab(tmp_path, SLEEP=0.2), "-n", "100")
        for _ in range(3):
            wait_for(lambda: state(home, run).experiments >= 2, what="experiments")
            proc = rloopd("replay", run, "--json", home=home)
            assert proc.returncode == 0, proc.stdout
        rloopd("stop", run, home=home)
    finally:
        d.close()
