"""What one agent can take from the machine: disk, the daemon's memory through what it reads, its socket's
threads. Found by the hostile-agent campaign (ops/chaos/hostile.py); each case here is its short form."""

from __future__ import annotations

import socket
import time

from rloopd.control import read_message
from rloopd.loop import Loop
from rloopd.runsocket import MAX_CONNECTIONS, RunSocket, call

from .test_sessions import events, lab_with_agent, start


def test_a_session_that_fills_the_disk_is_ended_and_its_files_go(home, tmp_path):
    """RLIMIT_FSIZE bounds one file, not how many: past disk_mb the session ends (`disk-cap`); a workspace
    over workspace_mb goes back to the best commit whole, .git included; notes.md is cut at notes_mb."""
    lab = lab_with_agent(tmp_path, """
head -c 2000000 /dev/zero | tr '\\\\0' n > memory/notes.md
mkdir -p workspace/.git && for k in 1 2 3; do head -c 1500000 /dev/zero > workspace/.git/pack$k; done
i=0
while [ $i -lt 400 ]; do head -c 1000000 /dev/zero > "$TMPDIR/fill$i" || break; i=$((i+1)); done
echo "wrote $i files"
sleep 30
""", "empty_cap = 1\ndisk_mb = 16\nworkspace_mb = 4\nnotes_mb = 1\nfile_mb = 2\n")
    run = start(home, lab, n=1)
    t0 = time.monotonic()
    state = Loop(home, run).run()
    assert time.monotonic() - t0 < 20  # ended at the cap, not by the sleep
    [ended] = events(home, run, "session.ended")
    output = home.blobs.get(ended["output_blob"]).decode()
    assert ended["reason"] == "disk-cap" and "disk_mb = 16" in output, output
    found = [v["found"] for v in events(home, run, "integrity.violated")]
    assert any("workspace_mb = 4" in f for f in found) and any("notes_mb = 1" in f for f in found), (found, output)
    [notes] = [w for w in events(home, run, "memory.written") if w["path"] == "notes.md"]
    assert len(home.blobs.get(notes["blob"])) == 1 << 20
    assert not (home.run_dir(run) / "workspace" / ".git").exists()
    assert not any((home.path / "sessions" / run / "tmp").glob("fill*"))
    assert state.status == "finished" and state.step == 0


def test_a_submit_of_a_workspace_over_its_cap_is_refused_with_the_key(home, tmp_path):
    lab = lab_with_agent(tmp_path, """
head -c 3000000 /dev/zero > workspace/weights.bin
rloopd submit -m "with the weights"; echo "first exit $?"
rm workspace/weights.bin
sed -i 's/^DEPTH = .*/DEPTH = 3/' workspace/train.py
rloopd submit -m "without them"; echo "second exit $?"
""", "empty_cap = 1\nworkspace_mb = 2\n")
    run = start(home, lab, n=1)
    state = Loop(home, run).run()
    output = home.blobs.get(events(home, run, "session.ended")[0]["output_blob"]).decode()
    assert "workspace_mb = 2" in output and "first exit 2" in output and "second exit 0" in output, output
    assert [s["message"] for s in events(home, run, "experiment.submitted")] == ["without them"]
    assert state.step == 1


def test_a_connection_flood_on_a_run_socket_is_answered_without_a_thread_each(tmp_path):
    sock = RunSocket(tmp_path / "s.sock", {"submit": lambda args: {"step": 1}})
    held = []
    try:
        for _ in range(MAX_CONNECTIONS + 20):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            for _ in range(100):  # a full accept queue answers EAGAIN: the flood waits for the server
                try:
                    s.connect(str(tmp_path / "s.sock"))
                    break
                except BlockingIOError:
                    time.sleep(0.02)
            held.append(s)
        refused = read_message(held[-1])  # past the cap: told at once, not left hanging
        assert refused["ok"] is False and f"over {MAX_CONNECTIONS} connections" in refused["error"]
        for s in held:
            s.close()
        deadline = time.monotonic() + 15  # the held ones give their slots back as the server sees them close
        while True:
            try:
                assert call(tmp_path / "s.sock", "submit", {}, timeout=5) == {"step": 1}
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        for s in held:
            s.close()
        sock.close()


def test_a_window_that_closes_on_an_unsubmitted_change_finishes_the_run_at_its_best_commit(home, tmp_path):
    """The session the window ended is not an empty one (empty_cap = 1 would have ended the run for it), and
    the change it never submitted is not left in the finished run's workspace."""
    lab = lab_with_agent(tmp_path, "sed -i 's/^WIDTH = .*/WIDTH = 128/' workspace/train.py\nsleep 60\n",
                         "empty_cap = 1\n")
    run = start(home, lab, n=5, window="2s")
    state = Loop(home, run).run()
    assert [e["reason"] for e in events(home, run, "session.ended")] == ["window"]
    assert events(home, run, "run.finished")[-1]["reason"] == "window" and state.status == "finished"
    assert "WIDTH = 128" not in (home.run_dir(run) / "workspace" / "train.py").read_text()


def test_a_directory_swapped_for_a_link_to_a_fifo_never_blocks_the_walks(tmp_path):
    """os.fwalk opens a directory it has checked with a plain open() that follows links: an agent swapping the
    directory for a link to a FIFO in between blocked the root daemon for good. Ours open O_NOFOLLOW."""
    import ctypes
    import os
    import threading

    from rloopd.fstree import remove
    from rloopd.snapshots import read_tree, tree_bytes

    root = tmp_path / "ws"
    (root / "d").mkdir(parents=True)
    (root / "d" / "train.py").write_text("x = 1\n")
    os.mkfifo(tmp_path / "fifo")
    (root / "link").symlink_to(tmp_path / "fifo")
    libc = ctypes.CDLL(None, use_errno=True)
    done = threading.Event()

    def swap() -> None:  # renameat2(RENAME_EXCHANGE): the directory and the link trade places, atomically
        a, b = str(root / "d").encode(), str(root / "link").encode()
        while not done.is_set():
            libc.renameat2(-100, a, -100, b, 2)

    swapper = threading.Thread(target=swap, daemon=True)
    walks = {"n": 0}

    def walk_a_lot() -> None:
        deadline = time.monotonic() + 2
        try:
            while time.monotonic() < deadline:
                tree_bytes(root)
                read_tree(root)
                walks["n"] += 1
        except Exception as e:  # noqa: BLE001 - a race the walk does not survive is the failure
            walks["error"] = repr(e)

    walker = threading.Thread(target=walk_a_lot, daemon=True)
    swapper.start()
    walker.start()
    walker.join(timeout=20)
    done.set()
    swapper.join()
    assert not walker.is_alive(), "a walk blocked on the FIFO"
    assert "error" not in walks and walks["n"] > 10, walks
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        remove(fd, "ws")
    finally:
        os.close(fd)
    assert not root.exists() and (tmp_path / "fifo").exists()  # the link went, not what it pointed at
