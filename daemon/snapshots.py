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

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from rloopd.errors import RloopdError
from rloopd.fstree import TreeTooDeep, remove, walk

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


class TreeTooLarge(RloopdError):
    """A tree holds more bytes than the reader may take (read_tree's `max_bytes`)."""


class SnapshotError(RloopdError):
    """A git operation on the home's snapshot repository failed."""


def workspace_files(root: Path) -> list[str]:
    """Relative paths of the regular files and symlinks a snapshot takes, sorted."""
    return sorted(read_tree(root, contents=False))


def read_tree(root: Path, *, contents: bool = True, only: str | None = None,
              max_bytes: int | None = None) -> dict[str, tuple[str, bytes]]:
    """{relative path: (git mode, bytes)} for the regular files and symlinks under `root` (a symlink's bytes
    are its target), skipping `.git`, `__pycache__` and `*.pyc`; with `contents=False` the bytes are empty;
    with `only`, just that one entry of `root` itself (nothing if it is missing or not a file or link); past
    `max_bytes` read in all, TreeTooLarge (a live process may grow a file after a size check).

    An agent's processes may still run while the daemon (root) reads its workspace, and may swap a file or
    a directory for a symlink to a file only root can read. Every step is therefore taken relative to an
    open directory (`fstree.walk`) and every file is opened with O_NOFOLLOW and checked with fstat, so what is
    read is always the tree's own entry: a link is recorded as a link, never followed.
    """
    found: dict[str, tuple[str, bytes]] = {}
    budget = max_bytes
    if only is not None:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            entry = _read_entry(fd, only, contents)
        finally:
            os.close(fd)
        return {only: entry} if entry is not None else {}
    for rel_dir, dirfd, others in walk(root, skip_dirs=frozenset(SKIP_DIRS)):
        for name, _ in others:  # a symlink to a directory is among them: stored as a link, never followed
            if name.endswith(SKIP_SUFFIXES) or name in SKIP_DIRS:
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            entry = _read_entry(dirfd, name, contents)
            if entry is not None:
                found[rel] = entry
                if budget is not None:
                    budget -= len(entry[1])
                    if budget < 0:
                        raise TreeTooLarge(f"{root}: more than {max_bytes} bytes")
    return found


def tree_bytes(root: Path, stop_at: int | None = None) -> int:
    """Bytes held by the regular files under `root`, everything counted (`.git` too), no link followed; every
    entry counts at least one block (4 KiB), so a million empty files are not free; the count stops once it
    passes `stop_at`, and a tree too deep to walk counts as past it. What a session's disk cap measures."""
    total = 0
    try:
        for _, _, others in walk(root):
            for _, st in others:
                total += max(st.st_size, st.st_blocks * 512, 4096) if stat.S_ISREG(st.st_mode) else 4096
            total += 4096  # the directory itself
            if stop_at is not None and total > stop_at:
                break
    except TreeTooDeep:
        return (stop_at or 0) + 1
    except OSError:
        pass
    return total


def read_head(root: Path, rel: str, limit: int) -> bytes | None:
    """At most `limit` bytes of the regular file `root/rel` (one name, no link followed), or None."""
    try:
        dirfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except OSError:
        return None
    finally:
        os.close(dirfd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], limit
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_entry(dirfd: int, name: str, contents: bool) -> tuple[str, bytes] | None:
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            try:
                return "120000", os.readlink(name, dir_fd=dirfd).encode() if contents else b""
            except OSError as e:
                if e.errno in (errno.EINVAL, errno.ENOENT):
                    return None  # swapped for a file or a directory since the stat: the tree is being changed
                raise
        if not stat.S_ISREG(st.st_mode):
            return None  # a fifo, socket or device is not part of a snapshot
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        try:  # swapped for a link since the stat: record the link
            return "120000", os.readlink(name, dir_fd=dirfd).encode() if contents else b""
        except OSError:
            return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        mode = "100755" if st.st_mode & stat.S_IXUSR else "100644"
        if not contents:
            return mode, b""
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return mode, b"".join(chunks)
    finally:
        os.close(fd)


def put_file(root: Path, rel: str, data: bytes | None, *, mode: int = 0o644, uid: int | None = None,
             link: bool = False) -> None:
    """Make `root/rel` hold `data` (None: remove it; `link`: a symlink to `data`), as root, safely while
    untrusted processes write the tree.

    Each directory on the way is opened relative to the one before with O_NOFOLLOW; a component that is a
    link or a file is removed and made a directory; the entry itself is removed (a directory recursively,
    by file descriptor) and created with O_EXCL|O_NOFOLLOW. Nothing can steer the write outside `root`.
    `uid`: owner of what is created (the run's uid, so the agent can go on editing it).
    """
    parts = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            fd = _enter(fd, part, create=data is not None, uid=uid)
            if fd is None:
                return  # a parent is missing: nothing to remove
        _remove_entry(fd, parts[-1])
        if data is None:
            return
        if link:
            os.symlink(data.decode(), parts[-1], dir_fd=fd)
            if uid is not None and os.geteuid() == 0:
                os.chown(parts[-1], uid, uid, dir_fd=fd, follow_symlinks=False)
            return
        out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                      dir_fd=fd)
        try:
            os.fchmod(out, mode)  # the umask must not drop the executable bit git recorded
            if uid is not None and os.geteuid() == 0:
                os.fchown(out, uid, uid)
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]
        finally:
            os.close(out)
    finally:
        if fd is not None:
            os.close(fd)


def _enter(fd: int, name: str, *, create: bool, uid: int | None) -> int | None:
    """Open directory `name` under `fd` (closing `fd`), replacing a link or file there when `create`."""
    try:
        try:
            return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError as e:  # ENOTDIR: a file; ELOOP: a link (O_NOFOLLOW); ENOENT: nothing
            if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                raise
            if not create:
                return None
            if e.errno != errno.ENOENT:
                os.unlink(name, dir_fd=fd)
        os.mkdir(name, 0o755, dir_fd=fd)
        if uid is not None and os.geteuid() == 0:
            os.chown(name, uid, uid, dir_fd=fd, follow_symlinks=False)
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _remove_entry(fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove(fd, name)  # by file descriptor, never following a link (shutil.rmtree's open would)
    else:
        os.unlink(name, dir_fd=fd)


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
        return self.commit_entries(self.entries(workspace), run=run, ref=ref, message=message, parent=parent)

    def entries(self, workspace: Path) -> dict[str, tuple[str, str]]:
        """{path: (git mode, blob sha)} of the workspace, its blobs written to the repository."""
        return self.entries_of(read_tree(Path(workspace)))

    def entries_of(self, tree_files: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, str]]:
        """{path: (git mode, blob sha)} of files given as `read_tree` gives them, their blobs written."""
        if not tree_files:
            return {}
        # the bytes were read safely (read_tree); git hashes copies in a private directory, never a path in
        # the workspace, which could be a different file by the time git opens it
        with tempfile.TemporaryDirectory(prefix="rloopd-snap-") as tmp:
            names = []
            for i, (_, data) in enumerate(tree_files.values()):
                (Path(tmp) / str(i)).write_bytes(data)
                names.append(str(Path(tmp) / str(i)))
            shas = self._git("hash-object", "-w", "--no-filters", "--stdin-paths",
                             input="\n".join(names).encode()).split()
        return {rel: (mode, sha.decode()) for (rel, (mode, _)), sha in zip(tree_files.items(), shas, strict=True)}

    def tree(self, entries: dict[str, tuple[str, str]]) -> str:
        """The tree id of these entries (written to the repository; nothing else changes)."""
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if entries:  # an empty workspace (e.g. a restore killed half-way) is the empty tree, not an error
                listing = "".join(f"{mode} {sha}\t{rel}\n" for rel, (mode, sha) in entries.items())
                self._git("update-index", "--add", "--index-info", input=listing.encode(), env=env)
            return self._git("write-tree", env=env).decode().strip()

    def commit_entries(self, entries: dict[str, tuple[str, str]], *, run: str, ref: str, message: str,
                       parent: str | None = None) -> str:
        """A commit of exactly these entries (see `entries`, `ls`), pinned under refs/rloopd/<run>/<ref>."""
        args = ["commit-tree", self.tree(entries), "-m", message]
        if parent:
            args += ["-p", parent]
        commit = self._git(*args).decode().strip()
        self._git("update-ref", f"refs/rloopd/{run}/{ref}", commit)
        return commit

    def restore(self, commit: str, workspace: Path) -> None:
        """Make `workspace` hold exactly the commit's files (an agent's own `.git` there is left alone).

        The commit is written to a private directory beside the workspace first; then, by file descriptor,
        the workspace's entries are removed and the new ones renamed in. An agent process still running
        cannot make this write outside the workspace (a rename never follows the link it replaces).
        """
        workspace = Path(workspace)
        workspace.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".rloopd-restore-", dir=workspace.parent))
        try:
            self.export(commit, staging)
            src = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            dst = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                for name in os.listdir(dst):
                    if name != ".git":
                        _remove_entry(dst, name)
                for name in os.listdir(src):
                    for _ in range(3):
                        try:
                            os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
                            break
                        except OSError as e:  # the agent made an entry there meanwhile: ours wins
                            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                                raise
                            _remove_entry(dst, name)
                    else:
                        raise SnapshotError(f"cannot restore {workspace / name}: it keeps being recreated")
            finally:
                os.close(src)
                os.close(dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

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

    def ls(self, commit: str) -> dict[str, tuple[str, str]]:
        """{path: (git mode, blob sha)} of every file and link in the commit."""
        out = self._git("ls-tree", "-r", "-z", "--full-tree", commit).decode()
        found = {}
        for item in filter(None, out.split("\0")):
            meta, path = item.split("\t", 1)
            mode, _, sha = meta.split()
            found[path] = (mode, sha)
        return found

    def files(self, commit: str) -> dict[str, bytes]:
        """{path: bytes} of every regular file in the commit, in one `cat-file --batch` call."""
        listing = {p: sha for p, (mode, sha) in self.ls(commit).items() if mode != "120000"}
        if not listing:
            return {}
        out = self._git("cat-file", "--batch", input="".join(f"{sha}\n" for sha in listing.values()).encode())
        found, pos = {}, 0
        for path in listing:
            header_end = out.index(b"\n", pos)
            size = int(out[pos:header_end].split()[2])
            found[path] = out[header_end + 1:header_end + 1 + size]
            pos = header_end + 1 + size + 1
        return found

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

    @staticmethod
    def blob_sha(data: bytes) -> str:
        """git's id of a blob holding `data` (sha1 of its header and bytes), computed without git."""
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def tree_equal(self, commit: str, workspace: Path) -> bool:
        """Whether the workspace holds exactly the commit's files (no ref is touched: runs may ask at once)."""
        return self.tree(self.entries(workspace)) == self._git("rev-parse", f"{commit}^{{tree}}").decode().strip()
