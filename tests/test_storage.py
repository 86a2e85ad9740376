"""A full disk mid-run (ops/chaos/storage.py, short): the daemon waits and says why, loses and corrupts
nothing, and goes on by itself once there is space again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import need_root, need_tool

SCRIPT = Path(__file__).resolve().parents[1] / "ops" / "chaos" / "storage.py"


def test_a_full_disk_stalls_the_runs_and_they_go_on_when_space_is_back():
    need_root()
    need_tool("unshare")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size-mb", "32", "--runs", "1", "--hold", "1"],
                          capture_output=True, text=True, timeout=300)
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, figures
    assert figures["stall_seen"] and figures["status_says_why"] and figures["went_on"], figures
    assert any("full" in why or "space" in why for why in figures["stall_reasons"]), figures
    assert figures["audit_while_full"] and figures["problems"] == []
    assert figures["experiments_after"] > figures["experiments_before"]


def test_storage_full_is_read_from_the_exception_chain():
    import errno
    import sqlite3

    from rloopd.service import storage_full
    from rloopd.snapshots import SnapshotError

    assert storage_full(sqlite3.OperationalError("database or disk is full")) == "database or disk is full"
    assert storage_full(OSError(errno.ENOSPC, "No space left on device", "/h/blobs/x")) == \
        "No space left on device: /h/blobs/x"
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise SnapshotError("git hash-object failed") from e
    except SnapshotError as wrapped:
        assert storage_full(wrapped) == "Disk quota exceeded"
    assert storage_full(SnapshotError("fatal: git says\nerror: No space left on device (short write)")) == \
        "error: No space left on device (short write)"
    assert storage_full(ValueError("something else")) is None and storage_full(None) is None



def test_a_database_at_max_db_mb_stalls_the_runs_until_a_restart_raises_the_cap(tmp_path):
    """The cap (rloopd.toml's max_db_mb), not the disk, is what is full: the run waits and status says to raise
    it; the log audits; a restart with a larger cap (the flag wins over the file) lets the run go on."""
    from rloopd import control
    from rloopd.audit import audit
    from rloopd.home import Home
    from rloopd.replay import replay

    from .daemon_helpers import Served, cli, detach, make_lab, state, wait_for

    home = tmp_path / "home"
    home.mkdir()
    (home / "rloopd.toml").write_text('gpus = "none"\ncpu_slots = 1\nmax_db_mb = 0.06\n')

    def stalled(run: str) -> dict | None:  # in-process: a CLI call costs most of a second here
        return control.call(home, "status")["runs"].get(run, {}).get("stalled")

    def verified(run: str) -> bool:
        with Home.open(home, create=False) as h:
            return audit(h.log, h.blobs).ok and not replay(h, run).divergences

    daemon = Served(home).start()
    try:
        run = detach(home, make_lab(tmp_path), "-n", "100000")
        wait_for(lambda: stalled(run), 30, "the run to wait at the cap")
        assert "max_db_mb=0.06" in stalled(run)["why"] and verified(run)
        text = cli(home, "status").stdout
        assert "waiting for space" in text and "max_db_mb=0.06" in text and "restart" in text, text
        before = state(home, run).experiments
        daemon.term()
        assert daemon.proc.returncode == 0, daemon.output()  # SIGTERM at the cap still stops cleanly
    finally:
        daemon.close()
    daemon = Served(home, "--max-db-mb", "1").start()
    try:
        wait_for(lambda: state(home, run).experiments > before + 2 and not stalled(run), 30,
                 "the run to go on under the larger cap")
    finally:
        daemon.close()
    assert verified(run)


def test_a_program_change_that_cannot_be_recorded_is_retried_not_lost(home, tmp_path, monkeypatch):
    """The program watcher outlives a write that fails for want of space, and records the change once it can."""
    import sqlite3

    from rloopd import runs
    from rloopd.history import run_state
    from rloopd.watch import ProgramWatcher

    from .daemon_helpers import make_lab

    lab = make_lab(tmp_path)
    run = runs.create_run(home, lab, agent="random", experiments=1, budget=None, seed=0, name=None)
    program = lab / "program.md"
    program.write_text("new rules\n")
    watcher = ProgramWatcher(home.path, lambda: {program: [run]}, None)
    real = home.log.append
    monkeypatch.setattr(home.log, "append", lambda *a, **k: (_ for _ in ()).throw(
        sqlite3.OperationalError("database or disk is full")))
    watcher.check(home, {program: [run]})  # raised before: the watcher thread died, later edits went unseen
    assert watcher.retry and run_state(home.log, run).program_blob != home.blobs.put(b"new rules\n")
    monkeypatch.setattr(home.log, "append", real)
    watcher.check(home, {program: [run]})
    assert not watcher.retry and run_state(home.log, run).program_blob == home.blobs.put(b"new rules\n")
