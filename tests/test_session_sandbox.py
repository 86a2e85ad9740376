"""The session sandbox: an agent writes its workspace, notes and artifacts, and nothing else of the home."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.home import Home
from rloopd.loop import Loop
from rloopd.memory.state import parse_at
from rloopd.runsocket import RunSocket
from rloopd.sandbox import (
    SandboxError,
    SessionLimits,
    _belongs,
    allocate_uid,
    give_to,
    kill_uid,
    run_uid,
    session_sandbox,
)
from rloopd.session import SessionSpec, run_session

from .conftest import IN_CI, need_root, need_tool
from .daemon_helpers import Served, make_lab, state, wait_for

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


# --- without bubblewrap (sandbox "setpriv"): the home's modes and the run's uid are all that confine ---

def spare_uids(n: int) -> list[int]:
    """Uids from the top of the run range that no process uses now: test runs on one machine share the range
    (each home allocates from its bottom), and `kill_uid` must not end another test's processes."""
    busy = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            busy |= {int(u) for line in open(f"/proc/{pid}/status") if line.startswith("Uid:")
                     for u in line.split()[1:]}
        except OSError:
            continue
    return [u for u in range(61999, 61900, -1) if u not in busy][:n]


@pytest.fixture
def visible(monkeypatch):
    """A directory every uid may pass through (pytest's own tree is 0700), and runs given spare uids."""
    top = Path(tempfile.mkdtemp(prefix="rloopd-setpriv-", dir="/var/tmp"))
    top.chmod(0o755)
    uids = spare_uids(4)
    monkeypatch.setattr(runs, "allocate_uid", lambda taken: uids.pop(0))
    yield top
    shutil.rmtree(top, ignore_errors=True)


def shell_lab(top: Path, name: str, script: str) -> Path:
    lab = make_lab(top, name)
    agent = lab / "agent.sh"
    agent.write_text("#!/bin/sh\n" + script)
    agent.chmod(0o755)
    with open(lab / "rloop.toml", "a") as f:
        f.write("\n[agent]\nbackoff = 0\ngrace = 1\nempty_cap = 1\n")
    return lab


def create(home: Home, lab: Path, n: int, sandbox: str = "setpriv") -> str:
    return runs.create_run(home, lab, agent=f"cmd:{lab / 'agent.sh'} {{prompt_file}}", experiments=n, budget=None,
                           seed=0, name=None, sandbox=sandbox)


def created_of(home: Home, run: str) -> dict:
    return next(home.log.read(run, until_n=0)).data


def session_output(home: Home, run: str) -> str:
    [ended] = [e.data for e in home.log.read(run, types=["session.ended"])]
    assert ended["reason"] == "agent-exit" and ended["exit_code"] == 0, ended
    return home.blobs.get(ended["output_blob"]).decode()


SHELL_PROBE = r"""
H=HOME_PATH; O=OTHER_RUN
try() { name=$1; shift; if out=$("$@" 2>&1 >/dev/null); then echo "PROBE $name|ok"; else echo "PROBE $name|$out"; fi; }
for p in events.db events.db-wal events.db-shm secrets/lab.json; do try "read:$p" head -c 16 "$H/$p"; done
for d in "" runs sessions tmp blobs git labs cache secrets "runs/$O" "sessions/$O" "tmp/$O"; do try "list:$d" ls "$H/$d"; done
try "read:other notes" cat "$H/runs/$O/memory/notes.md"
try "read:other program" cat "$H/runs/$O/program.md"
try "reach:other socket" ls -l "$H/sessions/$O/rloopd.sock"
try "write:frozen" sh -c 'echo "# owned" >> frozen/experiment.py'
try "write:program" sh -c 'echo "new rules" > program.md'
try "write:results" sh -c 'echo forged > memory/results.tsv'
try "write:memory" sh -c 'echo x > memory/planted.txt'
try "write:run dir" sh -c 'echo x > planted.txt'
try "own:list" ls .
try "own:program" cat program.md
try "own:frozen" cat frozen/experiment.py
try "own:notes" sh -c 'echo "mine" >> memory/notes.md'
try "own:artifacts" sh -c 'echo "a table" > memory/artifacts/table.txt'
try "own:home" sh -c 'echo x > "$HOME/x"'
try "own:socket" test -S "$RLOOPD_SOCKET" -a -w "$RLOOPD_SOCKET"
try "own:scratch" ls "$H/tmp/$RLOOPD_RUN/scratch"
exit 0
"""


def test_without_bubblewrap_the_run_uid_reads_nothing_of_the_home_but_its_own(visible):
    """setpriv: the agent sees the real filesystem, so the home's modes must keep it out of the event log,
    blobs, git, the judge's copies, secrets and other runs, and still let it into its own directories."""
    need_root()
    with Home.open(visible / "home") as home:
        other = create(home, shell_lab(visible, "other", "exit 0\n"), n=0)
        Loop(home, other).run()
        (home.run_dir(other) / "memory" / "notes.md").write_text("other's notes\n")
        other_uid = run_uid(created_of(home, other))
        other_sock = RunSocket(home.path / "sessions" / other / "rloopd.sock", {}, uid=other_uid)
        script = SHELL_PROBE.replace("HOME_PATH", shlex.quote(str(home.path))).replace("OTHER_RUN", other)
        run = create(home, shell_lab(visible, "mine", script), n=1)
        try:
            Loop(home, run).run()
        finally:
            other_sock.close()
        found = dict(line.removeprefix("PROBE ").split("|", 1) for line in session_output(home, run).splitlines()
                     if line.startswith("PROBE "))
        uid = run_uid(created_of(home, run))
    assert uid is not None and other_uid is not None and uid != other_uid
    denied = {k: v for k, v in found.items() if not k.startswith("own:")}
    assert len(denied) == 24 and all("Permission denied" in v for v in denied.values()), \
        {k: v for k, v in denied.items() if "Permission denied" not in v}
    assert all(v == "ok" for k, v in found.items() if k.startswith("own:")), found
    run_dir = home.run_dir(run)
    assert "owned" not in (run_dir / "frozen" / "experiment.py").read_text()
    assert not (run_dir / "planted.txt").exists() and not (run_dir / "memory" / "planted.txt").exists()
    assert (run_dir / "memory" / "notes.md").read_text() == "mine\n"
    st = os.stat(run_dir)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, uid, 0o750)
    for top in ("sessions", "tmp"):
        st = os.stat(home.path / top / run)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, uid, 0o710)


def test_without_bubblewrap_what_an_agent_left_with_setsid_is_killed(visible):
    """setsid (and a double fork) leaves the session's process group; the run's uid still marks it."""
    need_root()
    need_tool("setsid")
    script = r"""
setsid sleep 300 </dev/null >/dev/null 2>&1 &
first=$!
(setsid sh -c 'echo $$ > "$HOME/second"; exec sleep 300' </dev/null >/dev/null 2>&1 &)
sleep 0.5
echo "LEFT $first $(cat "$HOME/second")"
exit 0
"""
    with Home.open(visible / "home") as home:
        run = create(home, shell_lab(visible, "lab", script), n=1)
        Loop(home, run).run()
        left = [int(p) for p in next(x for x in session_output(home, run).splitlines()
                                      if x.startswith("LEFT ")).split()[1:]]
        uid = run_uid(created_of(home, run))
    assert len(left) == 2 and uid is not None
    alive = [p for p in os.listdir("/proc") if p.isdigit() and _belongs(p, uid)]
    assert alive == [], [open(f"/proc/{p}/cmdline").read() for p in alive]


def test_without_bubblewrap_a_setsid_process_holding_the_output_does_not_hold_the_session(visible):
    """A process that left the group keeps the agent's stdout open: the session still ends when the agent
    does (it is killed by the run's uid), not when that process would have."""
    need_root()
    need_tool("setsid")
    with Home.open(visible / "home") as home:
        run = create(home, shell_lab(visible, "lab", "setsid sleep 300 &\necho started\nexit 0\n"), n=1)
        Loop(home, run).run()
        started, ended = [e for e in home.log.read(run) if e.type in ("session.started", "session.ended")][:2]
        uid = run_uid(created_of(home, run))
        output = session_output(home, run)
    took = (parse_at(ended.at) - parse_at(started.at)).total_seconds()
    assert ended.data["reason"] == "agent-exit" and took < 20, took
    assert "started" in output
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _belongs(p, uid)]


def test_kill_uid_refuses_root_and_its_own_uid():
    with pytest.raises(SandboxError):
        kill_uid(0)
    with pytest.raises(SandboxError):
        kill_uid(os.getuid())


def python_for_run_uids() -> str:
    """An interpreter a run's uid may execute outside bubblewrap (the daemon's own may live under /root)."""
    for python in ("/usr/bin/python3", sys.executable):
        probe = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", "pass"]
        if os.path.exists(python) and subprocess.run(probe, capture_output=True).returncode == 0:
            return python
    if IN_CI:
        pytest.fail("no Python that uid 65534 may run (CI installs python3)")
    pytest.skip("no Python that uid 65534 may run")


DAEMON_PROBE = r"""
import json, os, socket
home, other = os.environ["PROBE_HOME"], os.environ["PROBE_OTHER"]
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ESCAPED"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"[:160]
def connect(path):
    s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(path); s.close()
attempt("edit frozen/", lambda: open("frozen/experiment.py", "a").write("# owned"))
attempt("chmod frozen/", lambda: os.chmod("frozen/experiment.py", 0o666))
attempt("write program.md", lambda: open("program.md", "w").write("new rules"))
attempt("write results.tsv", lambda: open("memory/results.tsv", "w").write("forged"))
attempt("read events.db", lambda: open(home + "/events.db", "rb").read(16))
def listed(name, path):  # under bubblewrap the home is an empty tmpfs with the run's own directories in it
    try:
        names = set(os.listdir(path))
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"[:160]
        return
    out[name] = "ESCAPED" if names - {os.environ["RLOOPD_RUN"], "runs", "sessions"} else f"its own: {sorted(names)}"
for d in ("", "/runs", "/sessions", "/tmp", "/blobs", "/git", "/labs", "/secrets"):
    listed("list the home" + d, home + d)
attempt("list another run", lambda: os.listdir(f"{home}/runs/{other}"))
attempt("read another run's notes", lambda: open(f"{home}/runs/{other}/memory/notes.md").read())
attempt("list another run's session", lambda: os.listdir(f"{home}/sessions/{other}"))
attempt("connect to another run's socket", lambda: connect(f"{home}/sessions/{other}/rloopd.sock"))
attempt("list another run's scratch", lambda: os.listdir(f"{home}/tmp/{other}"))
try:  # what it may do, to show that the probe ran where it should
    open("workspace/note.py", "w").write("# mine\n")
    connect(os.environ["RLOOPD_SOCKET"])
    out["own"] = "ok"
except Exception as e:
    out["own"] = f"{type(e).__name__}: {e}"
print("ESCAPES " + json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["bwrap", "setpriv"])
def test_escapes_fail_through_the_daemon(visible, kind):
    """A session driven by `rloopd serve`, with and without bubblewrap: nothing of the home but the run's own
    directories is reachable, and the daemon tightens an older, looser home when it starts."""
    need_root()
    if kind == "bwrap":
        need_tool("bwrap")
    python = python_for_run_uids()
    home_path = visible / "home"
    with Home.open(home_path) as home:
        other = create(home, shell_lab(visible, "other", "exit 0\n"), n=0, sandbox=kind)
        other_uid = run_uid(created_of(home, other))
        lab = shell_lab(visible, "lab", "")
        (lab / "agent.sh").write_text(f"#!{python} -I\n{DAEMON_PROBE}")
        with open(lab / "rloop.toml", "a") as f:
            f.write(f'env = {{ PROBE_HOME = "{home_path}", PROBE_OTHER = "{other}" }}\n')
        run = create(home, lab, n=1, sandbox=kind)
        uid = run_uid(created_of(home, run))
    (home_path / "runs" / other / "memory").mkdir()
    (home_path / "runs" / other / "memory" / "notes.md").write_text("other's notes\n")
    for path in (home_path, home_path / "events.db", home_path / "runs", home_path / "runs" / other):
        path.chmod(0o755)  # as an older rloopd left a home
    os.chown(home_path / "runs" / other, 0, 0)
    other_sock = RunSocket(home_path / "sessions" / other / "rloopd.sock", {"submit": lambda a: {"hijacked": True}},
                           uid=other_uid)
    served = Served(home_path).start()  # drives both runs (they are running): recovery, then their loops
    try:
        wait_for(lambda: state(home_path, run).status == "finished", timeout=120, what="the probing run")
        wait_for(lambda: state(home_path, other).status == "finished", timeout=60, what="the other run")
    finally:
        served.close()
        other_sock.close()
    with Home.open(home_path, create=False) as home:
        output = session_output(home, run)
        violated = [e.data for e in home.log.read(run, types=["integrity.violated"])]
    line = next((x for x in output.splitlines() if x.startswith("ESCAPES ")), None)
    assert line is not None, output
    results = json.loads(line.removeprefix("ESCAPES "))
    assert results.pop("own") == "ok", (results, output)
    assert [name for name, how in results.items() if how == "ESCAPED"] == [], results
    if kind == "setpriv":  # the modes did it (under bubblewrap the paths are simply not there)
        assert all(how.startswith("PermissionError") for how in results.values()), results
    assert "owned" not in (home_path / "runs" / run / "frozen" / "experiment.py").read_text()
    assert (home_path / "runs" / run / "program.md").read_text() != "new rules"
    assert not violated  # nothing got through, so nothing had to be put back
    mode = stat.S_IMODE(os.stat(home_path).st_mode)
    assert mode & 0o007 == 0o001 and stat.S_IMODE(os.stat(home_path / "events.db").st_mode) & 0o007 == 0
    for r, u in ((run, uid), (other, other_uid)):
        st = os.stat(home_path / "runs" / r)
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (u, 0o750)
