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
