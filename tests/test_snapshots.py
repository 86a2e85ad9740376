"""Workspace snapshots in the home's git repository, made and restored from outside the workspace."""

from __future__ import annotations

import os
import subprocess

from rloopd.snapshots import Snapshots

from .conftest import need_tool


def test_commit_restore_diff_round_trip(tmp_path):
    need_tool("git")
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "train.py").write_text("LR = 0.1\n")
    (ws / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(ws / "sub" / "run.sh", 0o755)
    (ws / "link").symlink_to("/etc/hostname")
    (ws / "__pycache__").mkdir()
    (ws / "__pycache__" / "x.pyc").write_bytes(b"junk")
    snaps = Snapshots(tmp_path / "git")
    c1 = snaps.commit(ws, run="r", ref="s0", message="baseline")
    assert snaps.read(c1, "train.py") == b"LR = 0.1\n"
    (ws / "train.py").write_text("LR = 0.2\n")
    (ws / "new.py").write_text("x = 1\n")
    c2 = snaps.commit(ws, run="r", ref="s1", message="lr", parent=c1)
    assert "-LR = 0.1" in snaps.diff(c1, c2) and "+x = 1" in snaps.diff(c1, c2)
    snaps.restore(c1, ws)
    assert (ws / "train.py").read_text() == "LR = 0.1\n" and not (ws / "new.py").exists()
    assert os.access(ws / "sub" / "run.sh", os.X_OK) and os.readlink(ws / "link") == "/etc/hostname"
    assert snaps.tree_equal(c1, ws) and not snaps.tree_equal(c2, ws)
    # the same tree on the same parent gives the same commit id: fixed dates, no host config
    assert snaps.commit(ws, run="r", ref="again", message="baseline") == c1


def test_agent_git_dir_and_hooks_are_ignored(tmp_path):
    need_tool("git")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "train.py").write_text("A = 1\n")
    subprocess.run(["git", "init", "-q", str(ws)], check=True)
    hook = ws / ".git" / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\ntouch {tmp_path}/hook-ran\n")
    hook.chmod(0o755)
    (ws / ".gitignore").write_text("train.py\n")
    snaps = Snapshots(tmp_path / "git")
    c = snaps.commit(ws, run="r", ref="s0", message="m")
    assert snaps.read(c, "train.py") == b"A = 1\n", "a workspace .gitignore must not hide files"
    assert not (tmp_path / "hook-ran").exists()
    snaps.restore(c, ws)
    assert (ws / ".git" / "HEAD").exists(), "the agent's own repository is left alone"


def test_an_emptied_workspace_is_the_empty_tree_and_restores(tmp_path):
    """A restore killed after it cleared the workspace leaves it empty; recovery must be able to snapshot
    that (it used to fail with git's 'malformed index info' and stop the daemon from starting)."""
    need_tool("git")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "train.py").write_text("LR = 0.1\n")
    snaps = Snapshots(tmp_path / "git")
    c1 = snaps.commit(ws, run="r", ref="s0", message="baseline")
    (ws / "train.py").unlink()
    empty = snaps.commit(ws, run="r", ref="s1", message="empty", parent=c1)
    assert "-LR = 0.1" in snaps.diff(c1, empty)
    assert not snaps.tree_equal(c1, ws)
    snaps.restore(c1, ws)
    assert snaps.tree_equal(c1, ws)


def test_a_link_to_a_private_file_is_stored_as_a_link_never_read_through(tmp_path):
    """The daemon reads workspaces as root: a link the agent plants must not copy a root-only file into git."""
    need_tool("git")
    private = tmp_path / "shadow"
    private.write_text("root only\n")
    private.chmod(0o600)
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "train.py").symlink_to(private)
    snaps = Snapshots(tmp_path / "git")
    c = snaps.commit(ws, run="r", ref="s0", message="x")
    assert snaps.read(c, "train.py") == str(private).encode()
    assert snaps.ls(c)["train.py"][0] == "120000"


def test_put_file_never_writes_through_a_planted_link(tmp_path):
    from rloopd.snapshots import put_file

    outside = tmp_path / "outside"
    outside.mkdir()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "data").symlink_to(outside)
    (ws / "x.py").symlink_to(outside / "target.py")
    put_file(ws, "data/table.txt", b"t\n")
    put_file(ws, "x.py", b"x\n", mode=0o755)
    assert not list(outside.iterdir())
    assert (ws / "data").is_dir() and not (ws / "data").is_symlink()
    assert (ws / "data" / "table.txt").read_bytes() == b"t\n" and os.access(ws / "x.py", os.X_OK)
    put_file(ws, "data", None)
    assert not (ws / "data").exists()
