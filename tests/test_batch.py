"""Batches: a batch file validated whole, its runs created with seeds, batch and condition, and run through
a daemon (or here, without one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rloopd.history import run_state
from rloopd.home import Home

from .conftest import rloopd
from .daemon_helpers import Served, make_lab


def batch_file(tmp_path: Path, lab: Path, body: str = "", conditions: str | None = None) -> Path:
    (tmp_path / "deeper.md").write_text("# go deeper\n")
    conditions = conditions if conditions is not None else """
[[conditions]]
name = "random"
agent = "random"

[[conditions]]
name = "all"
agent = "random:all"
program = "deeper.md"
"""
    path = tmp_path / "batch.toml"
    path.write_text(f'question = "Does changing everything at once beat one constant at a time?"\n'
                    f'lab = "{lab}"\nrepeats = 2\nexperiments = 3\nseed = 10\n{body}\n'
                    f'[criteria]\nbaseline = "random"\n{conditions}')
    return path


def test_a_batch_runs_through_the_daemon_with_its_seeds_conditions_and_program(tmp_path, home_dir):
    lab = make_lab(tmp_path)
    path = batch_file(tmp_path, lab)
    served = Served(home_dir, "--cpu-slots", "2").start()
    try:
        proc = rloopd("batch", "run", str(path), "--json", home=home_dir, timeout=180)
        assert proc.returncode == 0, proc.stderr + served.output()
    finally:
        served.close()
    info = json.loads(proc.stdout)
    rows = {r["condition"]: r for r in info["conditions"]}
    assert set(rows) == {"random", "all"}
    assert all(r["runs"] == 2 and r["finished"] == 2 and r["running"] == 0 and r["experiments"] == 6
               and r["cap"] == 6 for r in rows.values()), json.dumps(rows)
    with Home.open(home_dir) as h:
        [stream] = [s for s in h.log.streams() if s.startswith("batch:")]
        events = list(h.log.read(stream))
        assert [e.type for e in events] == ["batch.created"] + ["batch.run-added"] * 4
        assert events[0].data["question"].startswith("Does changing") and events[0].data["repeats"] == 2
        assert events[0].data["criteria"]["baseline"] == "random"
        added = [(e.data["condition"], run_state(h.log, e.data["run"])) for e in events[1:]]
        assert [c for c, _ in added] == ["random", "all", "random", "all"]  # repeat by repeat
        assert [s.created["seed"] for _, s in added] == [10, 10, 11, 11]
        for condition, s in added:
            assert s.created["batch"] == stream.removeprefix("batch:") and s.created["condition"] == condition
            assert s.status == "finished"
            if condition == "all":
                assert s.created["program_path"] == str(tmp_path / "deeper.md")
                assert h.blobs.get_text(s.created["program_blob"]) == "# go deeper\n"
                assert s.program_path == str(tmp_path / "deeper.md")
            else:
                assert s.created.get("program_path") is None
    status = rloopd("batch", "status", stream, "--json", home=home_dir, check=True)
    assert json.loads(status.stdout)["conditions"] == info["conditions"]
    table = rloopd("batch", "status", home=home_dir, check=True).stdout
    assert "random (baseline)" in table and "all" in table


def test_without_a_daemon_a_batch_runs_here(tmp_path, home_dir):
    lab = make_lab(tmp_path)
    path = batch_file(tmp_path, lab, conditions='[[conditions]]\nname = "random"\nagent = "random"\n')
    proc = rloopd("batch", "run", str(path), "--json", home=home_dir, timeout=180)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)["conditions"]
    assert row["finished"] == 2 and row["experiments"] == 6 and row["median"] is not None
    assert rloopd("batch", "run", str(path), "--detach", home=home_dir).returncode == 2  # no daemon to hand it to


@pytest.mark.parametrize("body,conditions,words", [
    ("", '[[conditions]]\nname = "random"\nagent = "gpt-agent"\n', ["conditions.0.agent", "gpt-agent"]),
    ('sandbox = "bogus"\n', None, ["sandbox", "bogus"]),
    ("", '[[conditions]]\nname = "random"\nagent = "random"\nprogram = "missing.md"\n',
     ["conditions.0.program", "missing.md", "does not exist"]),
    ("repeats = 0\n", None, ["repeats"]),
    ('window = "0.2s"\nbudget = "0.5"\n', None, [": window: 0.2s", "shorter than one experiment's budget"]),
    ('budget = "steps:0"\n', None, [": budget:"]),
    ("", '[[conditions]]\nname = "tpe"\nagent = "random"\n', ["criteria.baseline", "'random'"]),
    ("", '[[conditions]]\nname = "random"\nagent = "random"\n[[conditions]]\nname = "random"\nagent = "random"\n',
     ["share a name"]),
    ("colour = 3\n", None, ["colour"]),
    ("", '[[conditions]]\nname = "random"\nagent = "random"\nspace = "tiny"\n',
     ["conditions.0.space", "tiny", "defines no search space"]),
    ('space = "tiny"\n', None, [": space: tiny", "defines no search space"]),
    ("", '[[conditions]]\nname = "random"\nagent = "random"\nmemory = "forgetful"\n',
     ["conditions.0.memory", "forgetful", "use notes, none, results-only or from:RUN[@STEP]"]),
    ('memory = "from:nosuchrun@3"\n', None, [": memory: from:nosuchrun@3", "no run"]),
])
def test_bad_batch_files_name_the_field_and_create_nothing(tmp_path, home_dir, body, conditions, words):
    lab = make_lab(tmp_path)
    path = batch_file(tmp_path, lab, body, conditions)
    if "repeats = 0" in body or "colour" in body:
        text = path.read_text().replace("repeats = 2\n", "") if "repeats = 0" in body else path.read_text()
        path.write_text(text)
    proc = rloopd("batch", "run", str(path), home=home_dir)
    assert proc.returncode != 0
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and str(path) in line and all(w in line for w in words), line
    with Home.open(home_dir) as h:
        assert h.log.streams() == []  # nothing created


def test_a_lab_of_another_metric_is_refused(tmp_path, home_dir):
    lab = make_lab(tmp_path)
    (lab / "rloop.toml").write_text((lab / "rloop.toml").read_text().replace('name = "val_bpb"', 'name = "loss"'))
    path = batch_file(tmp_path, lab)
    path.write_text(path.read_text().replace("[criteria]\n", '[criteria]\nmetric = "val_bpb"\n'))
    proc = rloopd("batch", "run", str(path), home=home_dir)
    assert proc.returncode != 0 and "criteria.metric" in proc.stderr and "'loss'" in proc.stderr


def test_conditions_may_differ_in_memory_policy_and_search_space_only(tmp_path, home_dir):
    lab = make_lab(tmp_path)
    toml = lab / "rloop.toml"
    top, sep, rest = toml.read_text().partition("\n[")
    toml.write_text(top + '\n[spaces.lr]\neditable = ["workspace/*.py"]\n' + sep + rest)
    path = batch_file(tmp_path, lab, 'memory = "results-only"\n', conditions="""
[[conditions]]
name = "random"
agent = "random"

[[conditions]]
name = "lr-none"
agent = "random"
space = "lr"
memory = "none"
""")
    proc = rloopd("batch", "run", str(path), "--json", home=home_dir, timeout=180)
    assert proc.returncode == 0, proc.stderr
    rows = {r["condition"]: r for r in json.loads(proc.stdout)["conditions"]}
    assert (rows["random"]["memory"], rows["random"]["space"]) == ("results-only", None)
    assert (rows["lr-none"]["memory"], rows["lr-none"]["space"]) == ("none", "lr")
    with Home.open(home_dir) as h:
        made = {(e.data["condition"], e.data["memory_policy"], e.data["search_space"].get("preset"))
                for e in h.log.runs()}
    assert made == {("random", "results-only", None), ("lr-none", "none", "lr")}


def test_the_metric_defaults_to_the_labs_own_and_must_agree(tmp_path):
    from rloopd.batch import load_batch
    from rloopd.errors import LabConfigError

    mlp = Path(__file__).parent / "labs" / "mlp"
    path = batch_file(tmp_path, mlp)  # no criteria.metric: the mlp lab's val_accuracy, to be maximized
    spec, _ = load_batch(path)
    assert spec.criteria.metric == "val_accuracy"
    instant = make_lab(tmp_path)
    path.write_text(path.read_text() + f'\n[[conditions]]\nname = "other"\nagent = "random"\nlab = "{instant}"\n')
    with pytest.raises(LabConfigError, match=r"conditions.2.lab: .* reports 'val_bpb', but conditions.0's lab "
                                             r"reports \(set criteria.metric to say which is meant\) 'val_accuracy'"):
        load_batch(path)
