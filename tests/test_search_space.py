"""Search spaces: presets of editable globs and marked regions, enforced on agents and built-in policies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.errors import LabConfigError
from rloopd.history import run_state
from rloopd.lab import load_lab, read_constants
from rloopd.loop import Loop

from .conftest import rloopd
from .test_sessions import events, lab_with_agent

MARKED = '''"""The instant lab's train.py, narrowed: only the knobs region may change in the `knobs` space."""

# rloop: begin editable knobs
LEARNING_RATE = 0.01  # peak learning rate
DEPTH = 2  # blocks
# rloop: end editable
WIDTH = 64  # channels
STATUS = "ok"
SLEEP = 0.0
'''
SPACES = '''
space = "knobs"

[spaces.knobs]
editable = ["workspace/train.py"]
regions = ["knobs"]
description = "learning rate and depth"

[spaces.all]
editable = ["workspace/*.py"]
'''


def narrowed(lab: Path) -> Path:
    (lab / "workspace" / "train.py").write_text(MARKED)
    toml = lab / "rloop.toml"
    text = toml.read_text()
    top, sep, rest = text.partition("\n[")
    toml.write_text(top + SPACES + sep + rest)
    return lab


def test_an_edit_outside_the_region_is_recorded_and_put_back_while_the_edit_inside_is_kept(home, tmp_path):
    lab = narrowed(lab_with_agent(tmp_path, """
sed -i 's/^DEPTH = .*/DEPTH = 5  # blocks/; s/^WIDTH = .*/WIDTH = 128  # channels/' workspace/train.py
rloopd submit -m "deeper and wider" || exit 9
grep -q "^WIDTH = 64" workspace/train.py || exit 4    # put back before the experiment ran
"""))
    run = runs.create_run(home, lab, agent=f"cmd:{lab / 'agent.sh'} {{prompt_file}}", experiments=1, budget=None,
                          seed=0, name=None)
    created = run_state(home.log, run).created
    assert created["search_space"] == {"preset": "knobs", "editable": ["workspace/train.py"], "regions": ["knobs"],
                                       "description": "learning rate and depth"}
    Loop(home, run).run()
    assert [e["exit_code"] for e in events(home, run, "session.ended")] == [0]
    [violated] = [v for v in events(home, run, "integrity.violated") if v["step"] == 1]
    assert violated["paths"] == ["workspace/train.py"] and violated["reverted"]
    assert "changed outside the editable regions" in violated["found"]
    [started] = [e for e in events(home, run, "experiment.started") if e["step"] == 1]
    trained = read_constants(home.snapshots.read(started["commit"], "train.py").decode())
    assert trained["DEPTH"] == 5 and trained["WIDTH"] == 64  # the change inside the region, and only it


def test_broken_markers_put_the_whole_file_back(home, tmp_path):
    lab = narrowed(lab_with_agent(tmp_path, """
sed -i 's/^DEPTH = .*/DEPTH = 7/; /rloop: end editable/d' workspace/train.py
rloopd submit -m "no more end marker" || exit 9
"""))
    run = runs.create_run(home, lab, agent=f"cmd:{lab / 'agent.sh'} {{prompt_file}}", experiments=1, budget=None,
                          seed=0, name=None)
    Loop(home, run).run()
    [violated] = [v for v in events(home, run, "integrity.violated") if v["step"] == 1]
    assert "markers" in violated["found"]
    [started] = [e for e in events(home, run, "experiment.started") if e["step"] == 1]
    assert home.snapshots.read(started["commit"], "train.py").decode() == MARKED


def test_random_search_sets_only_the_constants_inside_the_space(home, tmp_path):
    from .daemon_helpers import make_lab

    lab = narrowed(make_lab(tmp_path))
    run = runs.create_run(home, lab, agent="random:all", experiments=4, budget=None, seed=1, name=None)
    Loop(home, run).run()
    changed = {k for e in events(home, run, "experiment.started") for k in e["params"]}
    assert changed and changed <= {"LEARNING_RATE", "DEPTH"}
    # the whole workspace under another preset of the same lab: WIDTH is a candidate again
    wide = runs.create_run(home, lab, agent="random:all", experiments=3, budget=None, seed=1, name=None, space="all")
    Loop(home, wide).run()
    assert "WIDTH" in {k for e in events(home, wide, "experiment.started") for k in e["params"]}


def test_bad_spaces_are_refused_with_one_line_and_nothing_created(home, tmp_path):
    from .daemon_helpers import make_lab

    lab = narrowed(make_lab(tmp_path))
    with pytest.raises(LabConfigError, match=r"--space nope: .* defines no search space 'nope' \(\[spaces\] presets: all, knobs\)"):
        runs.create_run(home, lab, agent="random", experiments=1, budget=None, seed=0, name=None, space="nope")
    toml = lab / "rloop.toml"
    toml.write_text(toml.read_text().replace('regions = ["knobs"]', 'regions = ["widths"]'))
    with pytest.raises(LabConfigError, match=r"rloop.toml: spaces.knobs.regions: no editable file marks a region 'widths'"):
        load_lab(lab)
    toml.write_text(toml.read_text().replace('regions = ["widths"]', 'regions = ["knobs"]'))
    train = lab / "workspace" / "train.py"
    train.write_text(MARKED.replace("# rloop: end editable\n", ""))  # unbalanced
    with pytest.raises(LabConfigError, match=r"rloop.toml: editable: workspace/train.py: line 3: the region begun here is never closed"):
        load_lab(lab)
    train.write_text(MARKED.replace("WIDTH = 64", "# rloop: begin editable knobs\nWIDTH = 64"))  # nested
    with pytest.raises(LabConfigError, match=r"workspace/train.py: line \d+: "):
        load_lab(lab)
    train.write_text(MARKED.replace("# rloop: begin editable knobs\n", "").replace(  # the region holds no constant
        "# rloop: end editable\n", "").replace("WIDTH = 64", "# rloop: begin editable knobs\n# rloop: end editable\nWIDTH = 64"))
    with pytest.raises(LabConfigError, match=r"--space knobs: leaves random no \[params\] constant to set"):
        runs.create_run(home, lab, agent="random", experiments=1, budget=None, seed=0, name=None)
    assert home.log.runs() == []


def test_the_space_is_shown_by_status_and_init_picks_one(home, tmp_path):
    proc = rloopd("init", str(tmp_path / "new"), "--space", "optimizer", check=True)
    assert "search space: optimizer" in proc.stdout
    assert load_lab(tmp_path / "new").space == "optimizer"
    bad = rloopd("init", str(tmp_path / "other"), "--space", "widths")
    assert bad.returncode == 2 and "--space widths" in bad.stderr and not (tmp_path / "other").exists()
    from .daemon_helpers import make_lab

    lab = narrowed(make_lab(tmp_path))
    rloopd("run", "--lab", str(lab), "-n", "1", "--space", "all", "--memory", "results-only", home=home.path, check=True)
    [row] = json.loads(rloopd("status", "--json", home=home.path, check=True).stdout)
    assert row["space"] == "all" and row["memory"] == "results-only"
    table = rloopd("status", home=home.path, check=True).stdout
    assert "results-only" in table  # a column shown where some run is not at the default
    rloopd("run", "--lab", str(lab), "-n", "0", home=home.path, check=True)  # the lab's default space: knobs
    table = rloopd("status", home=home.path, check=True).stdout
    assert "knobs" in table and "space" in table


def test_markers_that_do_not_parse_never_reach_a_commit_and_constants_only_holds_the_code(home, tmp_path):
    lab = narrowed(lab_with_agent(tmp_path, """
case "$RLOOPD_SESSION" in
1)  printf '# rloop: begin editable knobs\\nX = 1\\n' > workspace/extra.py   # never closed
    sed -i 's/^DEPTH = .*/DEPTH = 5  # blocks/' workspace/train.py
    rloopd submit -m "deeper, and a broken helper" || exit 9
    if [ -e workspace/extra.py ]; then exit 4; fi ;;
2)  sed -i 's/^DEPTH = .*/DEPTH = 6  # blocks\\nimport os/' workspace/train.py
    rloopd submit -m "code in a constants-only region" || exit 9 ;;
3)  chmod +x workspace/train.py
    sed -i 's/^DEPTH = .*/DEPTH = 7  # blocks/' workspace/train.py
    rloopd submit -m "an executable train.py" || exit 9 ;;
esac
"""))
    toml = lab / "rloop.toml"
    toml.write_text(toml.read_text().replace('editable = ["workspace/train.py"]\nregions = ["knobs"]',
                                             'editable = ["workspace/*.py"]\nregions = ["knobs"]\nconstants = true'))
    run = runs.create_run(home, lab, agent=f"cmd:{lab / 'agent.sh'} {{prompt_file}}", experiments=3, budget=None,
                          seed=0, name=None)
    assert run_state(home.log, run).created["search_space"]["constants"] is True
    Loop(home, run).run()
    assert [e["exit_code"] for e in events(home, run, "session.ended")] == [0, 0, 0]
    found = {v["step"]: v["found"] for v in events(home, run, "integrity.violated") if v["step"]}
    assert "do not parse" in found[1] and "only constant assignments" in found[2] and "mode" in found[3]
    commits = {e["step"]: e["commit"] for e in events(home, run, "experiment.started")}
    assert "extra.py" not in home.snapshots.ls(commits[1])
    assert read_constants(home.snapshots.read(commits[1], "train.py").decode())["DEPTH"] == 5
    assert b"import os" not in home.snapshots.read(commits[2], "train.py")
    assert home.snapshots.ls(commits[3])["train.py"][0] == "100644"
    assert read_constants(home.snapshots.read(commits[3], "train.py").decode())["DEPTH"] == 7


def test_a_fork_to_a_builtin_agent_must_leave_it_something_to_set(home, tmp_path):
    from rloopd.fork import fork_run

    lab = narrowed(lab_with_agent(tmp_path, "sed -i 's/^DEPTH = .*/DEPTH = 3  # blocks/' workspace/train.py\n"))
    toml = lab / "rloop.toml"  # WIDTH, outside the knobs region, is the only constant random could set
    kept = [line for line in toml.read_text().splitlines() if not line.startswith(("LEARNING_RATE =", "DEPTH ="))]
    toml.write_text("\n".join(kept) + "\n")
    run = runs.create_run(home, lab, agent=f"cmd:{lab / 'agent.sh'} {{prompt_file}}", experiments=1, budget=None,
                          seed=0, name=None)
    Loop(home, run).run()
    before = len(home.log.runs())
    with pytest.raises(LabConfigError, match=r"--agent random: the search space of run \w+ \(knobs\): leaves random no"):
        fork_run(home, run, 1, agent="random")
    assert len(home.log.runs()) == before
