"""Session mode end to end with small shell-script agents: real sessions, real submits, the instant lab."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.history import run_state
from rloopd.loop import Loop

from .conftest import rloopd
from .daemon_helpers import Served, make_lab, wait_for

SECRET = "Zq9-planted-service-token-Zq9"


def lab_with_agent(tmp_path: Path, script: str, agent_toml: str = "", **constants) -> Path:
    lab = make_lab(tmp_path, **constants)
    agent = lab / "agent.sh"
    agent.write_text("#!/bin/sh\nset -u\n" + script)
    agent.chmod(0o755)
    with open(lab / "rloop.toml", "a") as f:
        f.write("\n[agent]\nbackoff = 0\ngrace = 1\n" + agent_toml)
    return lab


def start(home, lab: Path, n: int = 4, window: str | None = None, sandbox: str = "auto") -> str:
    return runs.create_run(home, lab, agent=f"cmd:{lab / 'agent.sh'} {{prompt_file}}", experiments=n, budget=None,
                           seed=0, name=None, sandbox=sandbox, window=window)


def through_daemon(home, lab: Path, *args: str) -> str:
    """Run the lab's agent through a real `rloopd serve`, following it with `rloopd run` until it ends."""
    served = Served(home.path).start()
    try:
        proc = rloopd("run", "--lab", str(lab), "--agent", f"cmd:{lab / 'agent.sh'} {{prompt_file}}", *args,
                      "--json", home=home.path)
        assert proc.returncode == 0, proc.stderr + served.output()
    finally:
        served.close()
    return json.loads(proc.stdout.splitlines()[-1])["run_id"]


def events(home, run, type_):
    return [e.data for e in home.log.read(run, types=[type_])]


def test_sessions_submit_carry_notes_and_restart(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
case "$RLOOPD_SESSION" in
1)  sed -i 's/^DEPTH = .*/DEPTH = 3/' workspace/train.py
    echo "before the first submit" >> memory/notes.md
    rloopd submit -m "depth 3: more capacity" || exit 9
    echo "after the first submit" >> memory/notes.md || exit 8
    sed -i 's/^DEPTH = .*/DEPTH = 5/' workspace/train.py
    rloopd submit -m "depth 5" || exit 9
    echo "session 1 tried depth 3 and 5" >> memory/notes.md
    echo "a table" > memory/artifacts/table.txt ;;
*)  grep -q "session 1 tried depth 3 and 5" "$1" && echo "the prompt carries my notes"
    sed -i "s/^WIDTH = .*/WIDTH = $((RLOOPD_SESSION * 32))/" workspace/train.py ;;
esac
""")
    run = through_daemon(home, lab, "-n", "4")
    state = run_state(home.log, run)
    assert state.status == "finished" and state.step == 4
    submitted = events(home, run, "experiment.submitted")
    assert [s["message"] for s in submitted[:2]] == ["depth 3: more capacity", "depth 5"]
    assert [s["session"] for s in submitted] == [1, 1, 2, 3] and [s["step"] for s in submitted] == [1, 2, 3, 4]
    assert submitted[2]["message"] == "changes left in the workspace at the end of session 2"  # submitted for it
    started = events(home, run, "session.started")
    ended = events(home, run, "session.ended")
    assert len(started) == len(ended) == 3 and all(e["reason"] == "agent-exit" for e in ended)
    assert state.sessions == 3 and state.restarts == 2
    assert b"the prompt carries my notes" in home.blobs.get(ended[1]["output_blob"])
    written = {w["path"]: w for w in events(home, run, "memory.written")}
    assert written["notes.md"]["session"] == 1 and "artifacts/table.txt" in written
    assert (home.run_dir(run) / "memory" / "artifacts" / "table.txt").read_text() == "a table\n"
    acted = [json.loads(x)["data"] for x in rloopd("log", run, "--type", "agent.acted", "--json",
                                                    home=home.path).stdout.splitlines()]
    summaries = [a["summary"] for a in acted]
    assert summaries[:3] == ["memory/notes.md: 24 bytes", "workspace/train.py: +1 -1",
                             "rloopd submit -m 'depth 3: more capacity'"]
    notes = (home.run_dir(run) / "memory" / "notes.md").read_text()
    assert notes == "before the first submit\nafter the first submit\nsession 1 tried depth 3 and 5\n"
    assert "memory/notes.md: 77 bytes" in summaries and all(a["session"] in (1, 2, 3) for a in acted)
    assert rloopd("replay", run, home=home.path).returncode == 0
    assert rloopd("audit", home=home.path).returncode == 0


def test_an_agent_that_does_nothing_hits_the_empty_cap(home, tmp_path):
    lab = lab_with_agent(tmp_path, "echo nothing to do\n", "empty_cap = 2\n")
    run = through_daemon(home, lab, "-n", "4")
    state = run_state(home.log, run)
    assert state.status == "finished" and state.sessions == 2 and state.step == 0
    assert events(home, run, "run.finished")[-1]["reason"] == "empty-cap"


def test_a_missing_agent_command_is_recorded_and_the_run_ends_cleanly(home, tmp_path):
    lab = lab_with_agent(tmp_path, "", "empty_cap = 2\n")
    run = runs.create_run(home, lab, agent="cmd:/no/such/agent {prompt_file}", experiments=2, budget=None,
                          seed=0, name=None)
    state = Loop(home, run).run()
    ended = events(home, run, "session.ended")
    assert state.status == "finished" and [e["reason"] for e in ended] == ["error", "error"]
    assert b"cannot start '/no/such/agent'" in home.blobs.get(ended[0]["output_blob"])


def test_one_experiment_at_a_time_and_result_waits(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
sed -i 's/^DEPTH = .*/DEPTH = 2/' workspace/train.py
rloopd submit -m first --no-wait
rloopd submit -m second; echo "second exit $?"
rloopd result; echo "result exit $?"
exit 0
""", "empty_cap = 1\n", SLEEP=2)
    run = start(home, lab, n=2)
    Loop(home, run).run()
    out = home.blobs.get(events(home, run, "session.ended")[0]["output_blob"]).decode()
    assert "ticket" in out and "already running" in out and "second exit 2" in out
    assert "step 1: ok" in out and "result exit 0" in out


def test_changes_outside_the_editable_files_are_reverted_and_recorded(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
echo "planted" > workspace/data.bin
sed -i 's/^DEPTH = .*/DEPTH = 4/' workspace/train.py
rloopd submit -m "depth 4 and a data file"
echo "# owned" >> frozen/experiment.py 2>/dev/null
echo "new rules" > program.md 2>/dev/null
exit 0
""", "empty_cap = 1\n")
    run = start(home, lab, n=1, sandbox="none")
    Loop(home, run).run()
    [first, *rest] = events(home, run, "integrity.violated")
    assert first["paths"] == ["workspace/data.bin"] and first["step"] == 1
    assert not (home.run_dir(run) / "workspace" / "data.bin").exists()
    if rest:  # without bubblewrap the agent could write these; they are put back and recorded
        assert set(rest[0]["paths"]) <= {"frozen/experiment.py", "program.md"}
    assert "owned" not in (home.run_dir(run) / "frozen" / "experiment.py").read_text()
    assert (home.run_dir(run) / "program.md").read_text() != "new rules\n"
    commit = events(home, run, "experiment.started")[-1]["commit"]
    assert "data.bin" not in home.snapshots._git("ls-tree", "-r", "--name-only", commit).decode()


def test_secrets_are_found_nowhere_in_the_home(home, tmp_path, monkeypatch):
    monkeypatch.setenv("SERVICE_TOKEN", SECRET)  # as the daemon's environment file would give it
    lab = lab_with_agent(tmp_path, """
echo "my token is $SERVICE_TOKEN"
echo "token: $SERVICE_TOKEN" >> memory/notes.md
echo "sk-ant-api03-$(echo 3210zyxwvutsrqponmlkjihgfedcba | rev)" > memory/artifacts/found-a-key.txt
sed -i 's/^DEPTH = .*/DEPTH = 2/' workspace/train.py
rloopd submit -m "depth 2 (token $SERVICE_TOKEN)"
exit 0
""", "empty_cap = 1\n")
    run = start(home, lab, n=1)  # the script is recorded (a lab file), so it only makes the key when it runs
    Loop(home, run).run()
    assert events(home, run, "experiment.submitted")[0]["message"] == "depth 2 (token [REDACTED:SERVICE_TOKEN])"
    home.log.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for needle in (SECRET, "abcdefghijklmnopqrstuvwxyz0123"):
        found = subprocess.run(["grep", "-r", "-l", "--binary-files=text", needle, str(home.path)],
                               capture_output=True, text=True)
        assert found.stdout == "", (needle, found.stdout)
    ended = events(home, run, "session.ended")[0]
    assert b"my token is [REDACTED:SERVICE_TOKEN]" in home.blobs.get(ended["output_blob"])


def test_the_window_closes_on_a_live_session(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
sed -i 's/^DEPTH = .*/DEPTH = 2/' workspace/train.py
rloopd submit -m "depth 2"
sleep 60
""")
    run = through_daemon(home, lab, "-n", "10", "--window", "3s")
    state = run_state(home.log, run)
    [ended] = events(home, run, "session.ended")
    assert ended["reason"] == "window" and state.status == "finished" and state.restarts == 0
    assert events(home, run, "run.finished")[-1]["reason"] == "window"


def test_pause_ends_the_session_and_resume_starts_another_through_the_daemon(home_dir, tmp_path):
    lab = lab_with_agent(tmp_path, """
i=0
while :; do
  i=$((i+1)); sed -i "s/^DEPTH = .*/DEPTH = $((i % 6 + 1))/" workspace/train.py
  rloopd submit -m "depth $i" >/dev/null || sleep 0.2
done
""")
    served = Served(home_dir).start()
    try:
        spec = f"cmd:{lab / 'agent.sh'} {{prompt_file}}"
        run = json.loads(rloopd("run", "--lab", str(lab), "--agent", spec, "-n", "40", "--detach", "--json",
                                home=home_dir, check=True).stdout)["run_id"]
        wait_for(lambda: run_state_at(home_dir, run).step >= 2, what="two submits")
        assert json.loads(rloopd("pause", run, "--json", home=home_dir, check=True).stdout)["status"] == "paused"
        rloopd("resume", run, home=home_dir, check=True)
        wait_for(lambda: run_state_at(home_dir, run).sessions >= 2 and run_state_at(home_dir, run).step >= 4,
                 what="a second session")
        rloopd("stop", run, home=home_dir, check=True)
    finally:
        served.close()
    from rloopd.home import Home

    with Home.open(home_dir) as h:
        reasons = [e["reason"] for e in events(h, run, "session.ended")]
        assert reasons[0] == "paused" and reasons[-1] == "stopped" and run_state(h.log, run).restarts == 0
    assert rloopd("replay", run, home=home_dir).returncode == 0


def run_state_at(home_dir: Path, run: str):
    from rloopd.home import Home

    with Home.open(home_dir) as h:
        return run_state(h.log, run)


@pytest.mark.parametrize("template, words", [("Hello {history}", "unknown placeholder {history}")])
def test_a_bad_prompt_template_stops_the_run_before_it_starts(home, tmp_path, template, words):
    lab = lab_with_agent(tmp_path, "exit 0\n")
    (lab / "prompt.md").write_text(template)
    proc = rloopd("run", "--lab", str(lab), "--agent", "cmd:./agent.sh", home=home.path)
    assert proc.returncode == 2 and words in proc.stderr and "prompt.md" in proc.stderr
    assert not list(home.log.runs())


def test_submit_from_outside_a_session_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "RLOOPD_SOCKET"}
    proc = subprocess.run([sys.executable, "-m", "rloopd", "submit", "-m", "x"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "RLOOPD_SOCKET is not set" in proc.stderr


ESCAPES = r"""
import json, os, socket, subprocess
home = os.environ["ESCAPE_HOME"]
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ESCAPED"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"[:120]
attempt("edit frozen/", lambda: open("frozen/experiment.py", "a").write("# owned"))
attempt("read the lab's private files", lambda: os.listdir(os.environ["ESCAPE_LAB"] + "/frozen/private"))
attempt("read events.db", lambda: open(home + "/events.db", "rb").read(10))
attempt("list blobs", lambda: os.listdir(home + "/blobs"))
attempt("read another run", lambda: os.listdir(home + "/runs/" + os.environ["OTHER_RUN"]))
attempt("write outside the workspace", lambda: open("program.md", "w").write("new rules"))
attempt("write results.tsv", lambda: open("memory/results.tsv", "w").write("forged"))
attempt("chmod frozen/", lambda: os.chmod("frozen/experiment.py", 0o666))
attempt("remount /", lambda: subprocess.run(["mount", "-o", "remount,rw", "/"], check=True, capture_output=True))
def other_socket():
    s = socket.socket(socket.AF_UNIX); s.connect(home + "/sessions/" + os.environ["OTHER_RUN"] + "/rloopd.sock")
attempt("connect to another run's socket", other_socket)
kids = []
def bomb():
    while True:
        kids.append(subprocess.Popen(["sleep", "30"]))
attempt("fork bomb", bomb)
for k in kids:
    k.kill()
out["forked before the limit"] = len(kids)
attempt("allocate all memory", lambda: bytearray(64 << 30))
print("ESCAPES " + json.dumps(out))
"""


def test_escapes_fail_and_are_recorded(home, tmp_path, monkeypatch):
    from .conftest import need_root, need_tool

    need_tool("bwrap")
    need_root()
    from rloopd.runsocket import RunSocket

    other = start(home, lab_with_agent(tmp_path / "o", "exit 0\n"), n=0)
    (home.path / "sessions" / other).mkdir(parents=True, exist_ok=True)  # made with the run, as its own
    other_sock = RunSocket(home.path / "sessions" / other / "rloopd.sock", {"submit": lambda a: {"hijacked": True}})
    monkeypatch.setenv("ESCAPE_HOME", str(home.path))
    monkeypatch.setenv("OTHER_RUN", other)
    visible = Path(tempfile.mkdtemp(dir="/var/tmp"))  # a lab outside every hidden directory
    visible.chmod(0o755)
    lab = lab_with_agent(visible, "", "empty_cap = 1\nprocesses = 64\nmemory_mb = 1024\n")
    (lab / "agent.sh").write_text(f"#!{sys.executable}\n{ESCAPES}")  # the agent is the escape script itself
    monkeypatch.setenv("ESCAPE_LAB", str(lab))
    run = start(home, lab, n=1)
    try:
        Loop(home, run).run()
    finally:
        other_sock.close()
        shutil.rmtree(visible)
    [ended] = events(home, run, "session.ended")
    output = home.blobs.get(ended["output_blob"]).decode()
    line = next((x for x in output.splitlines() if x.startswith("ESCAPES ")), None)
    assert line is not None, output
    results = json.loads(line.removeprefix("ESCAPES "))
    escaped = [name for name, how in results.items() if how == "ESCAPED"]
    assert escaped == [], results
    assert results["forked before the limit"] < 64
    assert "owned" not in (home.run_dir(run) / "frozen" / "experiment.py").read_text()
    assert (home.run_dir(run) / "program.md").read_text() != "new rules"
    assert not events(home, run, "integrity.violated")  # nothing got through, so nothing had to be reverted


def test_the_labs_agent_spec_is_the_default(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
sed -i 's/^DEPTH = .*/DEPTH = 2/' workspace/train.py
exit 0
""", 'empty_cap = 1\nspec = "cmd:./agent.sh {prompt_file}"\n')
    proc = rloopd("run", "--lab", str(lab), "-n", "1", "--json", home=home.path)
    assert proc.returncode == 0, proc.stderr
    run = json.loads(proc.stdout.splitlines()[-1])["run_id"]
    assert next(home.log.read(run)).data["agent"] == "cmd:./agent.sh {prompt_file}"
    assert [s["message"] for s in events(home, run, "experiment.submitted")] == [
        "changes left in the workspace at the end of session 1"]


def test_a_silent_agent_and_a_flooding_one_are_ended_with_a_readable_reason(home, tmp_path):
    lab = lab_with_agent(tmp_path / "quiet", "echo starting; sleep 60\n", "empty_cap = 1\nquiet_timeout = 1\n")
    run = start(home, lab)
    Loop(home, run).run()
    [ended] = events(home, run, "session.ended")
    assert ended["reason"] == "timeout" and b"no output for 1 s" in home.blobs.get(ended["output_blob"])
    lab = lab_with_agent(tmp_path / "flood", "head -c 30000000 /dev/zero | tr '\\\\0' y; exit 0\n",
                         "empty_cap = 1\nmax_output_mb = 1\n")
    run = start(home, lab)
    state = Loop(home, run).run()
    [ended] = events(home, run, "session.ended")
    kept = home.blobs.get(ended["output_blob"])
    assert ended["reason"] == "agent-exit" and len(kept) < 1.1e6 and b"bytes of output not kept" in kept
    assert state.status == "finished"


def test_a_submit_after_the_window_closed_is_refused(home, tmp_path):
    import time

    from rloopd.log import NewEvent
    from rloopd.runsocket import SubmitRefused

    run = start(home, lab_with_agent(tmp_path, "exit 0\n"), n=5, window="1s")
    loop = Loop(home, run)
    loop.append(NewEvent("session.started", {"session": 1, "agent": "cmd:x"}))
    loop.sessions.session = 1
    time.sleep(1.1)  # the session's own time spends the window
    with pytest.raises(SubmitRefused, match="window has closed"):
        loop.sessions.submit({"message": "too late"})
    assert not events(home, run, "experiment.submitted")


def test_a_session_ended_while_its_submit_waits_lets_the_experiment_finish_first(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
sed -i 's/^DEPTH = .*/DEPTH = 2/' workspace/train.py
rloopd submit -m "depth 2"
sleep 30
""", "empty_cap = 1\nsession_timeout = 1\n", SLEEP=2)
    run = start(home, lab, n=3)
    Loop(home, run).run()
    kinds = [(e.type, e.data.get("step")) for e in home.log.read(run)
             if e.type in ("experiment.started", "experiment.decided", "session.ended", "run.finished")]
    assert kinds[:3] == [("experiment.started", 0), ("experiment.decided", 0), ("experiment.started", 1)]
    assert kinds[3] == ("experiment.decided", 1) and kinds[4][0] == "session.ended", kinds
    [ended] = events(home, run, "session.ended")[:1]
    assert ended["reason"] == "timeout"


def test_a_fork_of_a_run_with_an_open_session_does_not_carry_it(home, tmp_path):
    from rloopd.fork import fork_run
    from rloopd.log import NewEvent

    lab = lab_with_agent(tmp_path, "exit 0\n", "empty_cap = 1\n")
    run = start(home, lab, n=1)
    loop = Loop(home, run)
    loop.experiment(0, 0)
    loop.append(NewEvent("session.started", {"session": 1, "agent": "cmd:x"}))
    fork = fork_run(home, run, 0)
    state = run_state(home.log, fork)
    assert state.open_session is None and state.session_started_at is None
    Loop(home, fork).recover()
    assert not events(home, fork, "session.ended")


def test_changes_outside_the_editable_files_left_at_a_window_close_are_reverted(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
echo planted > workspace/data.bin
sleep 60
""")
    run = start(home, lab, n=5, window="2s")
    Loop(home, run).run()
    [violated] = events(home, run, "integrity.violated")
    assert violated["paths"] == ["workspace/data.bin"] and violated["step"] is None
    assert not (home.run_dir(run) / "workspace" / "data.bin").exists()
    assert events(home, run, "session.ended")[0]["reason"] == "window"


def test_a_fork_to_a_cmd_agent_checks_the_recorded_template(home, tmp_path):
    lab = lab_with_agent(tmp_path, "exit 0\n")
    (lab / "prompt.md").write_text("Do better: {history}")
    parent = runs.create_run(home, lab, agent="random", experiments=1, budget=None, seed=0, name="p")
    Loop(home, parent).run()
    before = len(list(home.log.read()))
    proc = rloopd("fork", parent, "1", "--agent", "cmd:./agent.sh {prompt_file}", home=home.path)
    assert proc.returncode == 2 and "unknown placeholder {history}" in proc.stderr and "prompt.md" in proc.stderr
    assert len(list(home.log.read())) == before


def test_deleted_and_symlinked_non_editable_files_are_put_back_inside_the_workspace(home, tmp_path):
    """A non-editable directory swapped for a link into memory/ must be restored inside the workspace: the
    daemon (root) writes by file descriptor and never through the agent's link."""
    lab = lab_with_agent(tmp_path, """
rm workspace/data/table.txt
rm workspace/notes.txt
rmdir workspace/data
ln -s ../memory/artifacts workspace/data
sed -i 's/^DEPTH = .*/DEPTH = 4/' workspace/train.py
rloopd submit -m "depth 4"
exit 0
""", "empty_cap = 1\n")
    (lab / "workspace" / "data").mkdir()
    (lab / "workspace" / "data" / "table.txt").write_text("frozen table\n")
    (lab / "workspace" / "notes.txt").write_text("kept\n")
    run = start(home, lab, n=1)
    Loop(home, run).run()
    [violated] = events(home, run, "integrity.violated")
    assert violated["step"] == 1
    assert set(violated["paths"]) == {"workspace/data", "workspace/data/table.txt", "workspace/notes.txt"}
    ws = home.run_dir(run) / "workspace"
    assert not (ws / "data").is_symlink() and (ws / "data" / "table.txt").read_text() == "frozen table\n"
    assert (ws / "notes.txt").read_text() == "kept\n"
    assert not (home.run_dir(run) / "memory" / "artifacts" / "table.txt").exists()
    assert not any(e["path"].endswith("table.txt") for e in events(home, run, "memory.written"))
    [decided] = [e for e in events(home, run, "experiment.decided") if e["step"] == 1]
    commit = events(home, run, "experiment.started")[-1]["commit"]
    assert home.snapshots.read(commit, "data/table.txt") == b"frozen table\n"


def test_the_agent_script_is_recorded_and_sessions_run_the_recorded_bytes(home, tmp_path):
    lab = lab_with_agent(tmp_path, 'echo "recorded script ran" >> memory/notes.md\nexit 0\n', "empty_cap = 1\n")
    run = start(home, lab, n=1)
    (lab / "agent.sh").write_text("#!/bin/sh\necho 'edited after creation' >> memory/notes.md\n")
    [entry] = run_state(home.log, run).created["agent_files"]
    assert entry["path"] == "agent.sh" and b"recorded script ran" in home.blobs.get(entry["blob"])
    Loop(home, run).run()
    notes = (home.run_dir(run) / "memory" / "notes.md").read_text()
    assert "recorded script ran" in notes and "edited" not in notes
    machine = runs.create_run(home, lab, agent="cmd:sh -c 'exit 0'", experiments=1, budget=None, seed=0,
                              name=None)
    assert run_state(home.log, machine).created["agent_files"] == []  # a program on PATH is not the lab's


def test_notes_that_link_to_a_root_only_file_are_not_read_through(home, tmp_path):
    """The daemon reads memory as root; a notes.md or artifact swapped for a link must not copy the target."""
    private = tmp_path / "root-only.txt"
    private.write_text("Zq9 root only Zq9\n")
    private.chmod(0o600)
    lab = lab_with_agent(tmp_path, f"""
rm -f memory/notes.md
ln -s {private} memory/notes.md
ln -s {private} memory/artifacts/copy.txt
exit 0
""", "empty_cap = 1\n")
    run = start(home, lab, n=1, sandbox="none")
    Loop(home, run).run()
    assert not [e for e in events(home, run, "memory.written") if e["blob"]]
    grep = subprocess.run(["grep", "-r", "-l", "Zq9 root only", str(home.path)], capture_output=True, text=True)
    assert grep.stdout == ""


def test_a_pause_during_the_submit_made_for_the_agent_still_closes_the_session(home, tmp_path, monkeypatch):
    """The agent left changes and exited; the daemon submits them; a pause interrupts that experiment. The
    session must still be recorded as ended (output kept), so the window clock stops with the pause; what
    the agent left in its HOME goes with the session, although the run is not finished."""
    import threading

    from rloopd.loop import LoopOptions, Stop

    monkeypatch.setenv("SERVICE_TOKEN", SECRET)
    lab = lab_with_agent(tmp_path, "sed -i 's/^DEPTH = .*/DEPTH = 5/' workspace/train.py\n"
                                   'mkdir -p "$HOME/.cache" && echo "$SERVICE_TOKEN" > "$HOME/.cache/t"\n'
                                   'echo "$SERVICE_TOKEN" > "$TMPDIR/t"\necho bye\nexit 0\n', SLEEP=3.0)
    run = start(home, lab, n=3)
    stop = Stop()
    loop = Loop(home, run, LoopOptions(stop=stop))
    worker = threading.Thread(target=loop.run)
    worker.start()
    wait_for(lambda: any("changes left" in e["message"] for e in events(home, run, "experiment.submitted")) and
             len(events(home, run, "experiment.started")) == 2, timeout=60)
    stop.set("paused", by="test")
    worker.join(60)
    [ended] = events(home, run, "session.ended")
    assert b"bye" in home.blobs.get(ended["output_blob"])
    state = run_state(home.log, run)
    assert state.status == "paused" and state.open_session is None and state.session_started_at is None
    assert [e["status"] for e in events(home, run, "experiment.finished")][-1] == "interrupted"
    home.log.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    found = subprocess.run(["grep", "-r", "-l", SECRET, str(home.path)], capture_output=True, text=True)
    assert found.stdout == ""


def test_the_empty_session_count_survives_a_daemon_restart(home, tmp_path):
    import threading

    from rloopd.loop import LoopOptions, Stop

    lab = lab_with_agent(tmp_path, "exit 0\n", "empty_cap = 2\n")
    (lab / "rloop.toml").write_text((lab / "rloop.toml").read_text().replace("backoff = 0", "backoff = 5"))
    run = start(home, lab, n=5)
    stop = Stop()
    worker = threading.Thread(target=Loop(home, run, LoopOptions(stop=stop)).run)
    worker.start()
    wait_for(lambda: len(events(home, run, "session.ended")) == 1, timeout=60)
    stop.set("shutdown")  # as a daemon going down: nothing is recorded, the run resumes
    worker.join(60)
    Loop(home, run).run()
    assert len(events(home, run, "session.ended")) == 2  # one more empty session, not two
    [finished] = events(home, run, "run.finished")
    assert finished["reason"] == "empty-cap"


def test_artifacts_over_their_cap_are_removed_and_recorded(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
head -c 700000 /dev/zero > memory/artifacts/big.bin
head -c 400000 /dev/zero > memory/artifacts/medium.bin
echo small > memory/artifacts/small.txt
exit 0
""", "empty_cap = 1\nartifacts_mb = 1\n")
    run = start(home, lab, n=1)
    Loop(home, run).run()
    [violated] = events(home, run, "integrity.violated")
    assert violated["paths"] == ["memory/artifacts/big.bin"] and "cap of 1 MB" in violated["found"]
    kept = {e["path"] for e in events(home, run, "memory.written") if e["blob"]}
    assert kept == {"artifacts/medium.bin", "artifacts/small.txt"}
    assert not (home.run_dir(run) / "memory" / "artifacts" / "big.bin").exists()
