"""The CLI as a user meets it: help for every command, README coverage, and one-line errors with exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import typer.main

from rloopd import __version__
from rloopd.cli import app
from rloopd.home import Home

from .conftest import need_root, rloopd

ROOT = Path(__file__).resolve().parents[1]


def all_commands() -> list[str]:
    """Every command path, groups included (e.g. `batch run`)."""
    group = typer.main.get_command(app)
    names = []

    def walk(cmd, prefix):
        for name, sub in getattr(cmd, "commands", {}).items():
            names.append(" ".join([*prefix, name]))
            walk(sub, [*prefix, name])

    walk(group, [])
    return sorted(names)


def test_every_command_has_help_and_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    commands = all_commands()
    assert {"log", "audit", "demo"} <= set(commands)
    for name in commands:
        proc = rloopd(*name.split(), "--help")
        assert proc.returncode == 0 and "Usage" in proc.stdout, name
        assert re.search(r"rloopd " + re.escape(name) + r"\b", readme), f"`rloopd {name}` is not in README.md"


def test_version():
    proc = rloopd("--version", check=True)
    assert proc.stdout.strip() == f"rloopd {__version__}"


def test_console_script_is_installed():
    exe = shutil.which("rloopd", path=str(Path(sys.executable).parent)) or shutil.which("rloopd")
    assert exe, "the rloopd console script is not installed"
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.startswith("rloopd ")


INSTANT = str(Path(__file__).parent / "labs" / "instant")


def test_log_json_lines_and_filters(home_dir):
    rloopd("run", "--lab", INSTANT, "-n", "3", home=home_dir, check=True)
    runs = json.loads(rloopd("audit", "--json", home=home_dir, check=True).stdout)["streams"]
    run = runs[0]["stream"]
    lines = rloopd("log", run, "--json", home=home_dir, check=True).stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert {"seq", "stream", "n", "type", "v", "at", "data", "prev", "hash"} <= set(events[0])
    assert [e["n"] for e in events] == list(range(len(events)))
    decided = rloopd("log", run[:6], "--type", "experiment.decided", "--json", home=home_dir, check=True)
    assert {json.loads(x)["type"] for x in decided.stdout.splitlines()} == {"experiment.decided"}
    name = events[0]["data"]["name"]
    assert rloopd("log", name, home=home_dir, check=True).stdout.count("experiment.started") == 4
    assert rloopd("log", run, "--type", "nonsense.type", home=home_dir).stdout == ""


def test_log_follow_sees_new_events(home_dir, home):
    home.log.append_one("home", "daemon.started", {"version": "x"})
    proc = subprocess.Popen([sys.executable, "-m", "rloopd", "log", "home", "--follow", "--json",
                             "--home", str(home_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline())["type"] == "daemon.started"
        home.log.append_one("home", "daemon.stopped", {"reason": "test"})
        assert json.loads(proc.stdout.readline())["type"] == "daemon.stopped"
    finally:
        proc.terminate()
        proc.wait(10)


def assert_one_line_error(proc, code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_unknown_stream(home_dir, home):
    home.log.append_one("home", "daemon.started", {"version": "x"})
    assert_one_line_error(rloopd("log", "no-such-run", home=home_dir), 2, "no-such-run")
    assert_one_line_error(rloopd("audit", "batch:nope", home=home_dir), 2, "batch:nope")


def test_missing_home(tmp_path):
    assert_one_line_error(rloopd("log", "home", home=tmp_path / "nothing"), 2, "no rloopd home")


def test_corrupt_and_foreign_databases_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "events.db").write_bytes(os.urandom(8192))
    assert_one_line_error(rloopd("audit", home=tmp_path / "a"), 2, "events.db", "not an rloopd event log")
    (tmp_path / "b").mkdir()
    import sqlite3
    con = sqlite3.connect(tmp_path / "b" / "events.db")
    con.execute("CREATE TABLE events (x)")
    con.commit()
    con.close()
    assert_one_line_error(rloopd("log", "home", home=tmp_path / "b"), 2, "not an rloopd event log")


def test_bad_expect_argument(home_dir, home):
    home.log.append_one("home", "daemon.started", {"version": "x"})
    assert_one_line_error(rloopd("audit", "--expect", "home", home=home_dir), 2, "--expect")


def as_nobody() -> list[str]:
    need_root()
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def public_tmp():
    """A directory every uid can traverse (pytest's own tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="rloopd-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_home_not_writable(public_tmp):
    home_dir = public_tmp / "home"
    with Home.open(home_dir) as home:
        home.log.append_one("home", "daemon.started", {"version": "x"})
    before = (home_dir / "events.db").stat().st_size
    env = {**os.environ, "NO_COLOR": "1", "HOME": "/tmp"}
    for args in (["run", "--lab", INSTANT], ["log", "home"], ["audit"]):
        proc = subprocess.run([*as_nobody(), sys.executable, "-m", "rloopd", *args, "--home", str(home_dir)],
                              capture_output=True, text=True, env=env)
        assert_one_line_error(proc, 2, str(home_dir), "not writable")
    assert (home_dir / "events.db").stat().st_size == before
    assert rloopd("audit", home=home_dir).returncode == 0


def test_uncreatable_home(public_tmp):
    proc = subprocess.run([*as_nobody(), sys.executable, "-m", "rloopd", "run", "--lab", INSTANT,
                           "--home", str(public_tmp / "h")],
                          capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
    assert_one_line_error(proc, 2, "cannot create the home")


def test_home_from_environment(tmp_path):
    env = {"RLOOPD_HOME": str(tmp_path / "envhome")}
    rloopd("run", "--lab", INSTANT, "-n", "0", env=env, check=True)
    assert (tmp_path / "envhome" / "events.db").exists()
    env = {"XDG_STATE_HOME": str(tmp_path / "xdg"), "RLOOPD_HOME": ""}
    rloopd("run", "--lab", INSTANT, "-n", "0", env=env, check=True)
    assert (tmp_path / "xdg" / "rloopd" / "events.db").exists()


@pytest.mark.slow
def test_demo_runs_end_to_end(home_dir):
    proc = rloopd("demo", "--experiments", "1", "--budget", "3", home=home_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "run directory:" in proc.stdout and "floor" in proc.stdout and "results" in proc.stdout
    assert rloopd("audit", home=home_dir).returncode == 0
