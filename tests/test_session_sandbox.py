"""The session sandbox: an agent writes its workspace, notes and artifacts, and nothing else of the home."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from rloopd.sandbox import SessionLimits, allocate_uid, give_to, session_sandbox
from rloopd.session import SessionSpec, run_session

from .conftest import need_root, need_tool

PROBE = r"""
import json, os, socket, subprocess, sys
out = {"uid": os.getuid(), "cap": [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")]}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except Exception as e:
        out[name] = type(e).__name__
def write(p):
    return lambda: open(p, "w").write("x")
attempt("workspace", write("workspace/new.py"))
attempt("notes", write("memory/notes.md"))
attempt("artifacts", write("memory/artifacts/plot.txt"))
attempt("home_dir", write(os.environ["HOME"] + "/.config"))
attempt("frozen", write("frozen/judge.py"))
attempt("program", write("program.md"))
attempt("results", write("memory/results.tsv"))
attempt("etc", write("/etc/escaped"))
attempt("events_db", lambda: open(HOME_PATH + "/events.db", "rb").read())
attempt("blobs", lambda: os.listdir(HOME_PATH + "/blobs"))
attempt("other_run", lambda: os.listdir(HOME_PATH + "/runs/other"))
attempt("chmod_frozen", lambda: os.chmod("frozen/judge.py", 0o777))
attempt("remount", lambda: subprocess.run(["mount", "-o", "remount,rw", "/"], check=True, capture_output=True))
attempt("net", lambda: socket.create_connection(("127.0.0.1", PORT), timeout=2).close())
attempt("memory", lambda: bytearray(1 << 30))
kids = []
def bomb():
    for _ in range(200):
        kids.append(subprocess.Popen(["sleep", "5"]))
attempt("fork_bomb", bomb)
out["forked"] = len(kids)
for k in kids:
    k.kill()
print(json.dumps(out))
"""


def make_run(home: Path, name: str) -> Path:
    run_dir = home / "runs" / name
    for d in ("workspace", "memory/artifacts", "frozen"):
        (run_dir / d).mkdir(parents=True)
    (run_dir / "workspace" / "train.py").write_text("LR = 1\n")
    (run_dir / "memory" / "notes.md").write_text("")
    (run_dir / "memory" / "results.tsv").write_text("step\n")
    (run_dir / "frozen" / "judge.py").write_text("# the judge\n")
    (run_dir / "program.md").write_text("# program\n")
    return run_dir


def test_a_session_is_confined_to_its_run(tmp_path):
    need_tool("bwrap")
    need_root()
    home = tmp_path / "home"
    (home / "blobs").mkdir(parents=True)
    (home / "events.db").write_text("the log")
    run_dir, other = make_run(home, "mine"), make_run(home, "other")
    session_dir = home / "sessions" / "mine"
    session_dir.mkdir(parents=True)
    uid = allocate_uid(set())
    give_to(uid, run_dir / "workspace", run_dir / "memory" / "notes.md", run_dir / "memory" / "artifacts", session_dir)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    script = PROBE.replace("HOME_PATH", repr(str(home))).replace("PORT", str(port))
    box = session_sandbox(uid, home=home, run_dir=run_dir, session_dir=session_dir, kind="bwrap",
                          limits=SessionLimits(processes=64, memory_mb=512))
    env = {"PATH": os.environ["PATH"], "HOME": str(session_dir)}
    result = run_session(SessionSpec([sys.executable, "-c", script], run_dir, env, timeout=60, prefix=tuple(box.prefix)))
    listener.close()
    assert result.reason == "agent-exit" and result.exit_code == 0, result.output[-2000:]
    out = json.loads(result.output.decode().strip().splitlines()[-1])
    assert out["uid"] == uid and out["cap"] == ["0000000000000000"]
    for allowed in ("workspace", "notes", "artifacts", "home_dir", "net"):
        assert out[allowed] == "ok", (allowed, out)
    for denied in ("frozen", "program", "results", "etc", "events_db", "blobs", "other_run", "chmod_frozen",
                   "remount", "memory", "fork_bomb"):
        assert out[denied] != "ok", (denied, out)
    assert out["forked"] < 64
    assert (run_dir / "frozen" / "judge.py").read_text() == "# the judge\n"
    assert not (other / "workspace" / "new.py").exists() and (run_dir / "workspace" / "new.py").exists()


def test_sigterm_reaches_the_agent_inside_bubblewrap(tmp_path):
    import threading

    need_tool("bwrap")
    home = tmp_path / "home"
    run_dir = make_run(home, "mine")
    session_dir = home / "sessions" / "mine"
    session_dir.mkdir(parents=True)
    box = session_sandbox(None, home=home, run_dir=run_dir, session_dir=session_dir, kind="bwrap")
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    script = "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.1; done"
    result = run_session(SessionSpec(["/bin/sh", "-c", script], run_dir, {"PATH": os.environ["PATH"]}, grace=5,
                                     prefix=tuple(box.prefix)), stop=stop, stop_reason=lambda: "window")
    assert result.reason == "window" and b"got TERM" in result.output, result.output


def test_give_to_never_follows_a_link_out_of_the_tree(tmp_path):
    need_root()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "host-file").write_text("root's")
    tree = tmp_path / "workspace"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.py").write_text("x")
    (tree / "escape").symlink_to(outside)  # a directory swapped for a link by the agent
    (tree / "file-link").symlink_to(outside / "host-file")
    give_to(61000, tree)
    assert os.stat(tree / "sub" / "a.py").st_uid == 61000 and os.lstat(tree / "escape").st_uid == 61000
    assert os.stat(outside / "host-file").st_uid == 0 and os.stat(outside).st_uid == 0
