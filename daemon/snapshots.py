"""Workspace snapshots as commits in the home's own git repository, made from outside the workspace.

The daemon never runs a command inside a workspace and reads no configuration from it: it walks the
files itself (skipping `.git`, `__pycache__` and `*.pyc`), writes blobs and a tree with plumbing
commands against `--git-dir`, and restores a workspace with `checkout-index`. Hooks, fsmonitor and every
user or system git configuration are off. Commit dates are fixed, so the same tree on the same parent has
the same id on every machine. Each snapshot gets a ref (`refs/rloopd/<run>/<name>`), so none is collected.

Example:
    snaps = Snapshots(home / "git")
    c1 = snaps.commit(workspace, run="r1", ref="s0-0", message="baseline")
    ...edit workspace...; snaps.restore(c1, workspace)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from rloopd.errors import RloopdError

SKIP_DIRS = {".git", "__pycache__"}
SKIP_SUFFIXES = (".pyc",)
_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0",
    "GIT_AUTHOR_NAME": "rloopd", "GIT_AUTHOR_EMAIL": "rloopd@localhost",
    "GIT_COMMITTER_NAME": "rloopd", "GIT_COMMITTER_EMAIL": "rloopd@localhost",
    "GIT_AUTHOR_DATE": "1700000000 +0000", "GIT_COMMITTER_DATE": "1700000000 +0000",
}
_SAFE = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "core.untrackedCache=false",
         "-c", "gc.auto=0"]


class SnapshotError(RloopdError):
    """A git operation on the home's snapshot repository failed."""


def workspace_files(root: Path) -> list[str]:
    """Relative paths of the regular files and symlinks a snapshot takes, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not os.path.islink(os.path.join(dirpath, d)))
        for d in list(os.listdir(dirpath)):
            full = os.path.join(dirpath, d)
            if os.path.islink(full) and os.path.isdir(full) and d not in SKIP_DIRS:
                filenames.append(d)  # a symlink to a directory is stored as a link, not followed
        for name in filenames:
            if name.endswith(SKIP_SUFFIXES):
                continue
            full = os.path.join(dirpath, name)
            if os.path.islink(full) or os.path.isfile(full):
                found.append(os.path.relpath(full, root))
    return sorted(set(found))


class Snapshots:
    def __init__(self, git_dir: Path):
        self.git_dir = Path(git_dir)
        if not (self.git_dir / "HEAD").exists():
            self.git_dir.mkdir(parents=True, exist_ok=True)
            self._git("init", "--bare", "--quiet", str(self.git_dir), git_dir=False)

    def _git(self, *args: str, input: bytes | None = None, env: dict | None = None,
             git_dir: bool = True, cwd: Path | None = None) -> bytes:
        cmd = ["git", *_SAFE]
        if git_dir:
            cmd.append(f"--git-dir={self.git_dir}")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")} | _ENV | (env or {})
        proc = subprocess.run([*cmd, *args], input=input, capture_output=True, env=full_env,
                              cwd=cwd or self.git_dir)
        if proc.returncode != 0:
            raise SnapshotError(f"git {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout

    def commit(self, workspace: Path, *, run: str, ref: str, message: str, parent: str | None = None) -> str:
        """Snapshot `workspace` as a commit (child of `parent`), pin it under refs/rloopd/<run>/<ref>."""
        workspace = Path(workspace)
        paths = workspace_files(workspace)
        entries = []
        regular = [p for p in paths if not os.path.islink(workspace / p)]
        if regular:
            listing = "\n".join(str(workspace / p) for p in regular).encode()
            shas = self._git("hash-object", "-w", "--no-filters", "--stdin-paths", input=listing).split()
            for p, sha in zip(regular, shas, strict=True):
                mode = "100755" if os.access(workspace / p, os.X_OK) else "100644"
                entries.append(f"{mode} {sha.decode()}\t{p}")
        for p in paths:
            if os.path.islink(workspace / p):
                sha = self._git("hash-object", "-w", "--stdin", input=os.readlink(workspace / p).encode())
                entries.append(f"120000 {sha.decode().strip()}\t{p}")
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if entries:  # an empty workspace (e.g. a restore killed half-way) is the empty tree, not an error
                self._git("update-index", "--add", "--index-info", input=("\n".join(entries) + "\n").encode(),
                          env=env)
            tree = self._git("write-tree", env=env).decode().strip()
        args = ["commit-tree", tree, "-m", message]
        if parent:
            args += ["-p", parent]
        commit = self._git(*args).decode().strip()
        self._git("update-ref", f"refs/rloopd/{run}/{ref}", commit)
        return commit

    def restore(self, commit: str, workspace: Path) -> None:
        """Make `workspace` hold exactly the commit's files (an agent's own `.git` there is left alone)."""
        workspace = Path(workspace)
        workspace.mkdir(parents=True, exist_ok=True)
        for child in workspace.iterdir():
            if child.name == ".git":
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.export(commit, workspace)

    def export(self, commit: str, dest: Path) -> None:
        """Write the commit's files under `dest` (which should be empty)."""
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            self._git("read-tree", commit, env=env)
            self._git(f"--work-tree={Path(dest).absolute()}", "checkout-index", "-a", "-f", env=env)

    def diff(self, old: str | None, new: str) -> str:
        """Unified diff from `old` (None: the empty tree) to `new`."""
        if old is None:
            old = self._git("hash-object", "-t", "tree", "--stdin", input=b"").decode().strip()
        return self._git("diff-tree", "-p", "--no-color", "--no-ext-diff", old, new).decode(errors="replace")

    def read(self, commit: str, path: str) -> bytes:
        return self._git("cat-file", "blob", f"{commit}:{path}")

    def exists(self, commit: str) -> bool:
        try:
            self._git("cat-file", "-e", f"{commit}^{{commit}}")
            return True
        except SnapshotError:
            return False

    def missing(self, commits: list[str]) -> list[str]:
        """The commits of `commits` that this repository does not hold (as commits), in one git call."""
        if not commits:
            return []
        out = self._git("cat-file", "--batch-check", input="".join(f"{c}^{{commit}}\n" for c in commits).encode())
        return [c for c, line in zip(commits, out.decode().splitlines(), strict=True) if line.split()[1:2] != ["commit"]]

    def pin(self, refs: dict[str, str]) -> None:
        """Point each ref name at its commit (refs keep commits from git's own garbage collection)."""
        self._git("update-ref", "--stdin", input="".join(f"update {r} {c}\n" for r, c in refs.items()).encode())

    def bundle(self, dest: Path, refs: dict[str, str]) -> None:
        """Write a git bundle of `refs` (name -> commit) and everything they reach to `dest`.

        The refs are made in a scratch repository that borrows this one's objects, so this repository is not
        changed, not even for a moment, while a daemon may be committing to it.
        """
        with tempfile.TemporaryDirectory(prefix="rloopd-bundle-") as tmp:
            scratch = Snapshots(Path(tmp))
            (scratch.git_dir / "objects" / "info" / "alternates").write_text(f"{(self.git_dir / 'objects').absolute()}\n")
            scratch.pin(refs)
            scratch._git("bundle", "create", "--quiet", str(Path(dest).absolute()), "--all")

    def unbundle(self, bundle: Path) -> None:
        """Verify a bundle and fetch all of it under refs/bundle/ (on a scratch repository: git checks every
        object's hash as it indexes the pack, so what is fetched from here later is what the bundle held)."""
        self._git("bundle", "verify", "--quiet", str(Path(bundle).absolute()))
        self._git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", str(Path(bundle).absolute()),
                  "+refs/*:refs/bundle/*")

    def fetch(self, source: Path, pattern: str) -> None:
        """Fetch the refs matching `pattern` (e.g. `refs/rloopd/*`) from another repository on this machine,
        under the same names; a ref that exists here with another commit is refused by git."""
        self._git("fetch", "--quiet", "--no-tags", "--no-write-fetch-head", str(Path(source).absolute()),
                  f"{pattern}:{pattern}")

    def tree_equal(self, commit: str, workspace: Path) -> bool:
        """Whether the workspace holds exactly the commit's files (for recovery checks)."""
        probe = self.commit(workspace, run="_probe", ref="last", message="probe")
        return self._git("rev-parse", f"{probe}^{{tree}}") == self._git("rev-parse", f"{commit}^{{tree}}")
