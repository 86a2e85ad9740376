"""Golden logs (tests/golden/): a recorded run replays clean; each altered copy is caught with its message;
a log written with an older payload version is read through its upcaster."""

from __future__ import annotations

import json
import shutil

import pytest

from rloopd.history import run_state

from .conftest import rloopd
from .golden import golden

RUN, V1 = golden.HERE / "run", golden.HERE / "v1-session"


def test_the_golden_run_replays_clean_and_says_what_it_said(home):
    run = golden.load(RUN, home)
    proc = rloopd("replay", run, "--json", home=home.path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["events"] == len(RUN.joinpath("events.jsonl").read_text().splitlines())
    assert rloopd("audit", home=home.path).returncode == 0
    state = run_state(home.log, run)  # what the recorded run claims, pinned
    finishes = [e.data for e in home.log.read(run, types=["experiment.finished"])]
    values = [f["metrics"]["val_bpb"] for f in finishes]
    assert state.status == "finished" and state.experiments == 4 and len(values) == 5
    assert state.best == min(v for v, d in zip(values, home.log.read(run, types=["experiment.decided"]),
                                               strict=True) if d.data["accepted"])
    tsv = (home.run_dir(run) / "memory" / "results.tsv").read_text().splitlines()
    assert len(tsv) == 6 and tsv[0].startswith("step\t")


@pytest.mark.parametrize("events_file, message", [
    ("altered-metric.jsonl", "hash does not match its contents"),
    ("altered-removed.jsonl", "position gap: expected n="),
])
def test_an_altered_golden_log_is_caught(home, events_file, message):
    run = golden.load(RUN, home, events_file)
    proc = rloopd("replay", run, home=home.path)
    assert proc.returncode == 1
    assert f"rloopd: replay diverged: event: {message}" in proc.stderr, proc.stderr
    assert rloopd("audit", home=home.path).returncode == 1


def test_a_swapped_blob_is_caught(home):
    run = golden.load(RUN, home)
    swap = json.loads((RUN / "swapped-blob.json").read_text())
    path = home.blobs.path(swap["blob"])
    path.chmod(0o644)
    shutil.copyfile(home.blobs.path(swap["with"]), path)
    proc = rloopd("replay", run, home=home.path)
    assert proc.returncode == 1
    assert f"blob {swap['blob']} is corrupt: its bytes hash to {swap['with']}" in proc.stderr, proc.stderr


def test_a_log_with_an_older_payload_version_is_upcast(home):
    run = golden.load(V1, home)
    assert rloopd("replay", run, home=home.path).returncode == 0
    assert rloopd("audit", home=home.path).returncode == 0  # the chain covers the stored v1 bytes
    proc = rloopd("log", run, "--type", "session.ended", "--json", home=home.path)
    [ended] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert ended["v"] == 1 and ended["data"]["usage"] == {"input": 5123, "output": 377}
    assert "tokens_in" not in ended["data"]
    stored = home.log.conn.execute("SELECT data FROM events WHERE type = 'session.ended'").fetchone()[0]
    assert '"tokens_in":5123' in stored  # the record itself is never rewritten
    assert run_state(home.log, run).sessions == 1
