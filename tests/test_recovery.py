"""A daemon killed with SIGKILL at any point loses nothing acknowledged and records nothing twice;
SIGTERM stops it cleanly within 10 s; systemd's notify protocol is spoken."""

from __future__ import annotations

import random
import socket
import time

import pytest

from rloopd.home import Home
from rloopd.invariants import check_run

from .daemon_helpers import Served, cli, detach, events, make_lab, state, wait_for


def check_consistent(home, runs: list[str]) -> None:
    """With the daemon stopped: audit passes, one real finish per (step, replica), interrupted attempts
    were started again, and each workspace sits at its run's best commit (rloopd.invariants)."""
    assert cli(home, "audit", check=False).returncode == 0
    with Home.open(home, create=False) as h:
        problems = [p for run in runs for p in check_run(h, run)]
    assert not problems, problems


@pytest.mark.timeout(240)
def test_sigkill_at_random_moments_then_restart(tmp_path):
    home = tmp_path / "home"
    lab = make_lab(tmp_path, SLEEP=0.15)
    d = Served(home, "--cpu-slots", "2").start()
    runs = [detach(home, lab, "-n", "25", "--seed", str(i)) for i in range(2)]
    rng = random.Random(7)
    kills = 0
    try:
        while kills < 6 and not all(state(home, r).status == "finished" for r in runs):
            time.sleep(rng.uniform(0.05, 0.6))
            d.kill()
            kills += 1
            d = Served(home, "--cpu-slots", "2").start()  # recovery happens before READY
            d.term()  # checks run with the daemon stopped, so nothing moves under them
            check_consistent(home, runs)
            d = Served(home, "--cpu-slots", "2").start()
        wait_for(lambda: all(state(home, r).status == "finished" for r in runs), timeout=120, what="runs to finish")
    finally:
        d.close()
    check_consistent(home, runs)
    assert kills >= 3
    for r in runs:
        assert state(home, r).experiments == 25
    restarts = [e for e in events(home, "home", "daemon.started")]
    assert len(restarts) == 2 * kills + 1 and any(e["data"]["recovery"]["runs"] for e in restarts[1:])


def test_sigterm_stops_cleanly_and_the_run_resumes(tmp_path):
    home = tmp_path / "home"
    d = Served(home).start()
    run = detach(home, make_lab(tmp_path, SLEEP=0.5), "-n", "6")
    wait_for(lambda: state(home, run).in_flight is not None, what="an experiment in flight")
    took = d.term()
    assert took < 10 and d.proc.returncode == 0
    st = state(home, run)
    assert st.status == "running" and st.in_flight is None and st.retry is not None
    assert events(home, "home", "daemon.stopped")[-1]["data"]["reason"] == "SIGTERM"
    d = Served(home).start()
    try:
        wait_for(lambda: state(home, run).status == "finished", what="the resumed run")
    finally:
        d.close()
    check_consistent(home, [run])


def test_notify_protocol_on_a_bound_socket(tmp_path):
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(20)
    d = Served(tmp_path / "home", env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"})
    d.start(wait=False)
    got = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not ({"READY=1", "WATCHDOG=1"} <= set(got)
                                                     and any(g.startswith("STATUS=") for g in got)):
            got.append(listener.recv(4096).decode())
        d.term()
        while "STOPPING=1" not in got:
            got.append(listener.recv(4096).decode())
    finally:
        d.close()
        listener.close()
    assert "READY=1" in got and "WATCHDOG=1" in got and "STOPPING=1" in got
    assert any(g.startswith("STATUS=") and "slots" in g for g in got)


def test_ready_only_after_recovery(tmp_path):
    home = tmp_path / "home"
    d = Served(home).start()
    run = detach(home, make_lab(tmp_path, SLEEP=1.0), "-n", "3")
    wait_for(lambda: state(home, run).in_flight is not None, what="an experiment in flight")
    d.kill()
    sock_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(sock_path))
    listener.settimeout(30)
    d = Served(home, env={"NOTIFY_SOCKET": str(sock_path)})
    d.start(wait=False)
    try:
        while listener.recv(4096).decode() != "READY=1":
            pass
        finishes = events(home, run, "experiment.finished")
        assert finishes and finishes[-1]["data"]["status"] == "interrupted", "recovered before READY"
    finally:
        d.close()
        listener.close()
