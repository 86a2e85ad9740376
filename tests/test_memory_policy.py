"""Memory policies (notes, none, results-only, from:RUN[@STEP]) and warm starts, through real sessions of
shell-script agents on the instant lab."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.errors import LabConfigError
from rloopd.fork import fork_point, fork_run
from rloopd.history import run_state
from rloopd.loop import Loop
from rloopd.memory.folded import fold_history

from .conftest import rloopd
from .test_sessions import events, lab_with_agent

# Each session checks what it is shown (exit codes name a failed check), then writes a note and an artifact
# and submits one change.
CHECKS = """
n=$RLOOPD_SESSION
[ -e memory/results.tsv ] && echo "results: yes" || echo "results: no"
[ -s memory/notes.md ] && echo "notes: $(cat memory/notes.md | tr '\\n' ' ')" || echo "notes: empty"
echo "artifacts: $(ls memory/artifacts | tr '\\n' ' ')"
echo "told: $(grep -c 'Nothing carries over' "$1")"
[ -e memory/checkpoint.pt ] && echo "checkpoint: yes" || echo "checkpoint: no"
echo "note from session $n" >> memory/notes.md
echo "artifact $n" > memory/artifacts/a$n.txt
sed -i "s/^WIDTH = .*/WIDTH = $((n * 32 + 32))/" workspace/train.py
rloopd submit -m "width $((n * 32 + 32))" || exit 9
grep -q "note from session $n" memory/notes.md || exit 3   # this session's notes survive its own submit
"""


def seen(home, run) -> list[dict[str, str]]:
    """What each session printed about its memory, as {check: answer}."""
    out = []
    for ended in events(home, run, "session.ended"):
        assert ended["exit_code"] == 0, home.blobs.get_text(ended["output_blob"])
        lines = home.blobs.get_text(ended["output_blob"]).splitlines()
        out.append(dict(line.split(": ", 1) for line in lines
                        if line.split(": ", 1)[0] in ("results", "notes", "artifacts", "checkpoint", "told")))
    return out


def make(home, lab: Path, memory: str | None, n: int = 3) -> str:
    return runs.create_run(home, lab, agent=f"cmd:{lab / 'agent.sh'} {{prompt_file}}", experiments=n, budget=None,
                           seed=0, name=None, sandbox="auto", memory=memory)


def test_none_starts_every_session_empty_while_the_log_keeps_what_was_written(home, tmp_path):
    lab = lab_with_agent(tmp_path, CHECKS)
    run = make(home, lab, "none")
    assert run_state(home.log, run).created["memory_policy"] == "none"
    Loop(home, run).run()
    shown = seen(home, run)
    assert len(shown) == 3
    for s in shown:  # no results, no notes, no artifacts, no checkpoint at any session start
        assert s == {"results": "no", "notes": "empty", "artifacts": "", "checkpoint": "no", "told": "1"}
    written = [(w["path"], home.blobs.get_text(w["blob"])) for w in events(home, run, "memory.written")]
    assert ("notes.md", "note from session 1\n") in written and ("notes.md", "note from session 3\n") in written
    assert ("artifacts/a2.txt", "artifact 2\n") in written
    assert not any(w["blob"] is None for w in events(home, run, "memory.written"))  # nothing recorded as deleted
    prompts = [home.blobs.get_text(e["output_blob"]) for e in events(home, run, "session.ended")]
    assert all("note from session" not in p.split("notes:")[1].splitlines()[0] for p in prompts)
    # the run directory after the run shows the last session's memory, rebuilt from the log: replay agrees
    memory = home.run_dir(run) / "memory"
    assert (memory / "notes.md").read_text() == "note from session 3\n" and not (memory / "results.tsv").exists()
    assert sorted(p.name for p in (memory / "artifacts").iterdir()) == ["a3.txt"]
    assert rloopd("replay", run, home=home.path).returncode == 0


def test_results_only_shows_results_but_carries_no_notes(home, tmp_path):
    lab = lab_with_agent(tmp_path, CHECKS)
    run = make(home, lab, "results-only", n=2)
    Loop(home, run).run()
    shown = seen(home, run)
    assert [s["results"] for s in shown] == ["yes", "yes"]
    assert [s["notes"] for s in shown] == ["empty", "empty"] and [s["artifacts"] for s in shown] == ["", ""]
    assert [s["checkpoint"] for s in shown] == ["no", "no"]
    assert (home.run_dir(run) / "memory" / "results.tsv").read_text().count("\n") == 4  # header, baseline, 2


def test_notes_carry_across_sessions(home, tmp_path):
    lab = lab_with_agent(tmp_path, CHECKS)
    run = make(home, lab, None, n=2)
    Loop(home, run).run()
    shown = seen(home, run)
    assert shown[0]["notes"] == "empty" and shown[1]["notes"] == "note from session 1 "
    assert shown[0]["told"] == "0"  # the prompt says what carries over, and here it all does
    assert shown[1]["artifacts"] == "a1.txt " and shown[1]["checkpoint"] == "yes"


def test_from_run_at_step_starts_with_exactly_that_runs_memory(home, tmp_path):
    lab = lab_with_agent(tmp_path, CHECKS)
    source = make(home, lab, "notes", n=3)
    Loop(home, source).run()
    before = len(home.log.runs())
    for bad, says in [("from:nosuchrun", "no run"), (f"from:{source}@9", "has no step 9"),
                      ("sometimes", "use notes, none"), (f"from:{source}@x", "whole number")]:
        with pytest.raises(LabConfigError, match=says) as e:
            make(home, lab, bad)
        assert str(e.value).startswith("--memory")
    assert len(home.log.runs()) == before  # nothing was created

    run = make(home, lab, f"from:{source}@2", n=1)
    created = run_state(home.log, run).created
    assert created["memory_policy"] == f"from:{source}@2"
    # the source's memory as its history stood where a fork at step 2 would continue
    stream, n = fork_point(home, source, 2)
    expected = fold_history(home.log, stream, n).mem
    got = {f["path"]: f["blob"] for f in created["memory_from"]["files"]}
    assert got == expected.visible and "artifacts/a2.txt" in got  # (a3: written before step 3 started)
    assert created["memory_from"]["checkpoint_blob"] == expected.checkpoint_blob is not None
    assert created["memory_from"]["lineage"][-1]["run"] == source
    memory = home.run_dir(run) / "memory"
    assert memory.joinpath("notes.md").read_bytes() == home.blobs.get(expected.visible["notes.md"])
    Loop(home, run).run()
    [shown] = seen(home, run)
    assert shown["notes"].startswith("note from session 1 note from session 2")
    assert shown["artifacts"].split() == sorted(p.removeprefix("artifacts/") for p in got if p != "notes.md")
    assert shown["checkpoint"] == "yes"
    # the inherited checkpoint survives the new run's own baseline: it is the source's best as of step 2
    state = fold_history(home.log, run)
    baseline = [e for e in home.log.read(run, types=["checkpoint.saved"]) if e.data["step"] == 0]
    assert baseline and state.mem.checkpoint_blob in (expected.checkpoint_blob,
                                                      *[e.data["blob"] for e in home.log.read(run, types=["checkpoint.saved"])
                                                        if e.data["step"] > 0])
    # knowledge passed on again: the lineage grows
    third = make(home, lab, f"from:{run}", n=0)
    assert [x["run"] for x in run_state(home.log, third).created["memory_from"]["lineage"]] == [source, run]
    assert rloopd("replay", run, home=home.path).returncode == 0


def test_from_refuses_a_source_whose_artifacts_are_over_the_cap(home, tmp_path):
    lab = lab_with_agent(tmp_path, CHECKS + 'head -c 300000 /dev/zero > memory/artifacts/big.bin\n',
                         agent_toml="artifacts_mb = 1\n")
    source = make(home, lab, None, n=1)
    Loop(home, source).run()
    small = tmp_path / "small"
    small.mkdir()
    lab2 = lab_with_agent(small, CHECKS, agent_toml="artifacts_mb = 0.1\n")
    with pytest.raises(LabConfigError, match=r"artifacts/ holds 0\.3 MB, over this lab's cap of 0\.1 MB"):
        make(home, lab2, f"from:{source}")


def test_artifacts_round_trip_through_fork_and_replay(home, tmp_path):
    lab = lab_with_agent(tmp_path, CHECKS)
    run = make(home, lab, None, n=3)
    Loop(home, run).run()
    fork = fork_run(home, run, 1, experiments=0)
    artifacts = home.run_dir(fork) / "memory" / "artifacts"
    stream, n = fork_point(home, run, 1)
    want = {p for p in fold_history(home.log, stream, n).mem.files if p.startswith("artifacts/")}
    assert {f"artifacts/{p.name}" for p in artifacts.iterdir()} == want and "artifacts/a1.txt" in want
    assert (artifacts / "a1.txt").read_text() == "artifact 1\n"
    for r in (run, fork):
        assert rloopd("replay", r, home=home.path).returncode == 0


def test_warm_start_is_offered_and_recorded(home, tmp_path):
    """A lab with warm_start = true offers the run's best checkpoint to every experiment after the baseline;
    experiment.started names it and experiment.finished says whether train(ctx) loaded it."""
    from .daemon_helpers import make_lab

    lab = make_lab(tmp_path)
    with open(lab / "rloop.toml", "r+") as f:
        text = f.read().replace('source = "synthetic"', 'source = "synthetic"\nwarm_start = true')
        f.seek(0)
        f.write(text)
    train = lab / "workspace" / "train.py"
    train.write_text(train.read_text() + "WARM_START = True\n")
    run = runs.create_run(home, lab, agent="random", experiments=2, budget=None, seed=3, name=None)
    Loop(home, run).run()
    started = {e["step"]: e for e in events(home, run, "experiment.started")}
    finished = {e["step"]: e for e in events(home, run, "experiment.finished")}
    assert started[0].get("warm_start_blob") is None and finished[0].get("warm_started") is None  # nothing to offer yet
    baseline_ckpt = next(e["blob"] for e in events(home, run, "checkpoint.saved") if e["step"] == 0)
    assert started[1]["warm_start_blob"] == baseline_ckpt
    assert json.loads(home.blobs.get(baseline_ckpt))["WIDTH"] == 64  # the instant lab's stand-in checkpoint
    assert finished[1]["warm_started"] is True
    shown = rloopd("show", run, "1", "--json", home=home.path)
    assert json.loads(shown.stdout)["warm_start"] == {"offered": baseline_ckpt, "used": True}

    # under `none` nothing is offered
    run2 = runs.create_run(home, lab, agent="random", experiments=1, budget=None, seed=3, name=None, memory="none")
    Loop(home, run2).run()
    assert all(e.get("warm_start_blob") is None for e in events(home, run2, "experiment.started"))


def test_a_from_run_trains_its_baseline_cold_and_offers_the_inherited_checkpoint_after(home, tmp_path):
    from .daemon_helpers import make_lab

    lab = make_lab(tmp_path)
    toml = lab / "rloop.toml"
    toml.write_text(toml.read_text().replace('source = "synthetic"', 'source = "synthetic"\nwarm_start = true'))
    source = runs.create_run(home, lab, agent="random", experiments=2, budget=None, seed=3, name="src")
    Loop(home, source).run()
    inherited = fold_history(home.log, source).mem.checkpoint_blob
    fork = fork_run(home, source, 1, name="src-fork", experiments=1)  # a source that is itself a fork
    run = runs.create_run(home, lab, agent="random", experiments=1, budget=None, seed=4, name=None,
                          memory=f"from:{fork}@0")
    created = run_state(home.log, run).created
    assert created["memory_from"]["lineage"] == [{"run": fork, "step": 0, "name": "src-fork"}]
    assert any(w["about"] == "memory" for w in events(home, run, "run.warned"))  # random reads no notes
    Loop(home, run).run()
    started = {e["step"]: e for e in events(home, run, "experiment.started")}
    step0_ckpt = next(e["blob"] for e in events(home, source, "checkpoint.saved") if e["step"] == 0)
    assert started[0].get("warm_start_blob") is None  # the baseline is the lab's code, trained cold
    assert started[1]["warm_start_blob"] == step0_ckpt == created["memory_from"]["checkpoint_blob"]
    assert inherited is not None


def test_what_a_crashed_session_wrote_is_captured_when_the_run_recovers(home, tmp_path):
    """A session left open by a crash: its notes and artifacts reach the log before session.ended
    (daemon-restart), under every policy."""
    from rloopd.log import NewEvent

    lab = lab_with_agent(tmp_path, "exit 0\n")
    run = make(home, lab, "none", n=0)
    home.log.append(run, [NewEvent("session.started", {"session": 1, "agent": "cmd:x"})], expected_n=1)
    memory = home.run_dir(run) / "memory"
    (memory / "artifacts").mkdir(parents=True, exist_ok=True)
    (memory / "notes.md").write_text("written before the crash\n")
    (memory / "artifacts" / "t.txt").write_text("a table\n")
    Loop(home, run).recover()
    after = [(e.type, e.data.get("path")) for e in home.log.read(run, from_n=2)]
    assert after[:2] == [("memory.written", "artifacts/t.txt"), ("agent.acted", None)] or \
        ("memory.written", "notes.md") in after
    kinds = [t for t, _ in after]
    assert kinds.index("session.ended") > max(i for i, t in enumerate(kinds) if t == "memory.written")
    written = {e.data["path"]: home.blobs.get_text(e.data["blob"]) for e in home.log.read(run, types=["memory.written"])}
    assert written == {"notes.md": "written before the crash\n", "artifacts/t.txt": "a table\n"}
