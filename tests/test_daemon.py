"""rloopd serve, driven only through the CLI: detach, status, pause/resume/stop, slots, windows, program edits."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from rloopd.memory.state import parse_at

from .daemon_helpers import Served, cli, detach, events, make_lab, state, wait_for


@pytest.fixture
def served(tmp_path):
    home = tmp_path / "home"
    d = Served(home, "--cpu-slots", "1").start()
    yield d
    d.close()


def test_detach_status_pause_resume_stop(served, tmp_path):
    home = served.home
    lab = make_lab(tmp_path, SLEEP=0.3)
    run = detach(home, lab, "-n", "200", "--name", "long")
    wait_for(lambda: state(home, run).experiments >= 2, what="two experiments")
    status = json.loads(cli(home, "status", "--json").stdout)
    [row] = [r for r in status if r["run_id"] == run]
    assert row["status"] == "running" and row["live"]["slot"] in ([], ["cpu0"]) and row["live"]["elapsed"] > 0
    paused = json.loads(cli(home, "pause", "long", "--json").stdout)
    assert paused["status"] == "paused"
    before = state(home, run)
    time.sleep(1.0)
    assert state(home, run).position == before.position, "a paused run appends nothing"
    assert json.loads(cli(home, "resume", run, "--json").stdout)["status"] == "running"
    wait_for(lambda: state(home, run).experiments > before.experiments, what="progress after resume")
    assert json.loads(cli(home, "stop", run, "--json").stdout)["status"] == "stopped"
    types = [e["type"] for e in events(home, run)]
    assert "run.paused" in types and "run.resumed" in types and types[-1] == "run.stopped"
    finishes = events(home, run, "experiment.finished")
    assert finishes[-1]["data"]["status"] == "interrupted" or types[-2] == "experiment.decided"
    assert cli(home, "audit").returncode == 0


def test_commands_on_unknown_or_finished_runs(served, tmp_path):
    home = served.home
    run = detach(home, make_lab(tmp_path), "-n", "1")
    wait_for(lambda: state(home, run).status == "finished", what="the run to finish")
    for args, words in ((["pause", "nope"], "nope"), (["pause", run], "finished"), (["resume", run], "finished"),
                        (["stop", run], "finished")):
        proc = cli(home, *args, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr
    assert cli(home, "status").returncode == 0, "the daemon keeps serving"


def test_two_runs_share_one_slot(served, tmp_path):
    home = served.home
    lab = make_lab(tmp_path, SLEEP=0.2)
    a, b = detach(home, lab, "-n", "4"), detach(home, lab, "-n", "4")
    wait_for(lambda: state(home, a).status == state(home, b).status == "finished", what="both runs")
    spans = []
    for run in (a, b):
        starts = events(home, run, "experiment.started")
        ends = events(home, run, "experiment.finished")
        spans += [(parse_at(s["at"]), parse_at(e["at"])) for s, e in zip(starts, ends, strict=True)]
    spans.sort()
    assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False)), "one slot, one experiment"


def test_window_closes_a_run(served, tmp_path):
    home = served.home
    run = detach(home, make_lab(tmp_path, SLEEP=0.4), "-n", "1000", "--window", "2s")
    wait_for(lambda: state(home, run).status == "finished", timeout=30, what="the window to close")
    st = state(home, run)
    [finished] = events(home, run, "run.finished")
    assert finished["data"]["reason"] == "window" and 2 <= st.experiments + 1 <= 7
    assert st.active_seconds <= 2.0 + 0.5


def test_live_program_edit_by_rename(served, tmp_path):
    home = served.home
    lab = make_lab(tmp_path, SLEEP=0.2)
    run = detach(home, lab, "-n", "400")
    wait_for(lambda: state(home, run).experiments >= 1, what="an experiment")
    tmp = lab / ".program.md.swp"
    tmp.write_text("# new instructions\nTry deeper models.\n")
    os.replace(tmp, lab / "program.md")  # how editors save
    wait_for(lambda: events(home, run, "program.changed"), timeout=20, what="program.changed")
    [changed] = events(home, run, "program.changed")
    blob = changed["data"]["program_blob"]
    wait_for(lambda: any(e["data"]["program_blob"] == blob for e in events(home, run, "experiment.started")),
             what="an experiment under the new program")
    assert (home / "runs" / run / "program.md").read_text().startswith("# new instructions")
    (lab / "program.md").unlink()  # a program file that disappears: the old version stays, with a warning
    wait_for(lambda: events(home, run, "run.warned"), timeout=20, what="run.warned")
    assert state(home, run).program_blob == blob and state(home, run).status == "running"
    other = tmp_path / "other.md"
    other.write_text("# its own program\n")
    out = json.loads(cli(home, "program", run, str(other), "--json").stdout)
    assert out["program"] == str(other) and state(home, run).program_path == str(other)
    cli(home, "stop", run)


def test_bad_control_messages_and_silent_clients(served):
    path = str(served.home / "rloopd.sock")

    def talk(data: bytes, read: bool = True) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            try:
                s.sendall(data)
            except BrokenPipeError:  # the daemon stopped reading an oversized message; its reply is there
                pass
            return json.loads(s.makefile().readline()) if read else {}

    assert talk(b"not json\n")["ok"] is False
    assert "unknown" in talk(b'{"op": "explode", "args": {}, "request": "r1"}\n')["error"]
    assert "over" in talk(b"x" * (2 << 20))["error"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(path)  # says nothing; the daemon must keep answering others
        assert json.loads(cli(served.home, "status", "--json").stdout) is not None
    assert (os.stat(path).st_mode & 0o777) == 0o660


def test_second_daemon_is_refused(served):
    proc = cli(served.home, "serve", check=False)
    assert proc.returncode == 2 and f"pid {served.proc.pid}" in proc.stderr and "daemon" in proc.stderr


def test_log_follow_sees_a_live_run(served, tmp_path):
    import subprocess
    import sys

    home = served.home
    run = detach(home, make_lab(tmp_path, SLEEP=0.2), "-n", "50")
    follow = subprocess.Popen([sys.executable, "-m", "rloopd", "log", run, "--follow", "--json", "--home", str(home)],
                              stdout=subprocess.PIPE, text=True)
    try:
        seen = [json.loads(follow.stdout.readline())["type"] for _ in range(12)]
        assert seen[0] == "run.created" and seen.count("experiment.started") >= 2
    finally:
        follow.terminate()
        follow.wait(10)
        cli(home, "stop", run)


def test_backup_during_a_live_run_audits_clean(served, tmp_path):
    home = served.home
    run = detach(home, make_lab(tmp_path, SLEEP=0.1), "-n", "100")
    wait_for(lambda: state(home, run).experiments >= 3, what="some experiments")
    out = json.loads(cli(home, "backup", str(tmp_path / "copy"), "--json").stdout)
    assert out["events"] > 5
    audit = cli(tmp_path / "copy", "audit", "--json", check=False)
    assert audit.returncode == 0, audit.stdout
    assert state(tmp_path / "copy", run).experiments >= 3
    cli(home, "stop", run)


def test_foreground_run_hands_over_to_the_daemon(served, tmp_path):
    proc = cli(served.home, "run", "--lab", str(make_lab(tmp_path)), "-n", "3", "--json")
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["status"] == "finished" and summary["experiments"] == 3
    assert "handed to the daemon" in proc.stderr
    assert (Path(served.output()).name or True)


def test_a_retried_command_is_applied_once(served, tmp_path):
    from rloopd import control

    home = served.home
    run = detach(home, make_lab(tmp_path, SLEEP=0.2), "-n", "200")
    wait_for(lambda: state(home, run).experiments >= 1, what="an experiment")
    first = control.call(home, "pause", {"run": run}, request="pause-1")
    again = control.call(home, "pause", {"run": run}, request="pause-1")  # the reply was lost; retried
    assert first["status"] == again["status"] == "paused"
    assert len(events(home, run, "run.paused")) == 1
    control.call(home, "resume", {"run": run}, request="resume-1")
    control.call(home, "resume", {"run": run}, request="resume-1")
    assert len(events(home, run, "run.resumed")) == 1
    created = control.call(home, "run", {"lab": str(make_lab(tmp_path, "lab2")), "experiments": 0}, request="run-1")
    same = control.call(home, "run", {"lab": str(tmp_path / "lab2"), "experiments": 0}, request="run-1")
    assert created == same
    cli(home, "stop", run)


def test_resume_right_after_pause_keeps_the_run_going(served, tmp_path):
    from rloopd import control

    home = served.home
    run = detach(home, make_lab(tmp_path, SLEEP=0.1), "-n", "300")
    for _ in range(3):
        wait_for(lambda: state(home, run).in_flight is not None, what="an experiment in flight")
        control.call(home, "pause", {"run": run})
        control.call(home, "resume", {"run": run})  # no gap: the old worker is still ending
        before = state(home, run).position
        wait_for(lambda b=before: state(home, run).position > b + 2, timeout=20, what="progress after resume")
    cli(home, "stop", run)


def test_a_run_given_its_own_program_ignores_the_old_file(served, tmp_path):
    home = served.home
    lab = make_lab(tmp_path, SLEEP=0.2)
    run = detach(home, lab, "-n", "300")
    wait_for(lambda: state(home, run).in_flight is not None, what="an experiment in flight")
    other = tmp_path / "other.md"
    other.write_text("# mine\n")
    cli(home, "program", run, str(other))
    tmp = lab / ".swp"
    tmp.write_text("# an edit to the lab's program\n")
    os.replace(tmp, lab / "program.md")
    time.sleep(2)
    changes = events(home, run, "program.changed")
    assert [c["data"]["source"] for c in changes] == ["cli"] and state(home, run).program_path == str(other)
    assert (home / "runs" / run / "program.md").read_text() == "# mine\n"
    cli(home, "stop", run)


def test_a_program_given_to_a_paused_run_replays(served, tmp_path):
    """Found by the kill campaign: the program command wrote program.md of a run no loop drives without
    moving the run directory's position, so replay compared it with an older program and failed."""
    home = served.home
    run = detach(home, make_lab(tmp_path, SLEEP=0.1), "-n", "300")
    wait_for(lambda: state(home, run).experiments >= 1, what="an experiment")
    cli(home, "pause", run)
    other = tmp_path / "paused.md"
    other.write_text("# while paused\n")
    cli(home, "program", run, str(other))
    assert (home / "runs" / run / "program.md").read_text() == "# while paused\n"
    assert cli(home, "replay", run, check=False).returncode == 0
    cli(home, "stop", run)


def test_malformed_arguments_get_an_answer(served):
    from rloopd import control

    for args in ({"run": 5}, {"run": None}, {}):
        with pytest.raises(Exception, match="malformed|no run"):
            control.call(served.home, "pause", args)
    assert cli(served.home, "status").returncode == 0


def test_a_second_serve_never_takes_the_socket(served):
    import signal as sig

    os.kill(served.proc.pid, sig.SIGSTOP)  # a daemon too busy to answer a ping
    try:
        proc = cli(served.home, "serve", check=False)
        assert proc.returncode == 2 and "already in use" in proc.stderr
    finally:
        os.kill(served.proc.pid, sig.SIGCONT)
    assert (served.home / "rloopd.sock").exists()
    assert json.loads(cli(served.home, "status", "--json").stdout) == []
