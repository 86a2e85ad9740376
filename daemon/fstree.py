"""Walking and removing trees an agent's live processes may still be changing, as root, without following a link.

`os.fwalk` and `shutil.rmtree(dir_fd=)` check an entry and then open it with a plain `open(name, O_RDONLY)`,
which follows links: an agent that swaps a directory for a link to a FIFO between the two makes a root
daemon block for good (or open a device). Here every directory is opened relative to its parent with
O_DIRECTORY|O_NOFOLLOW|O_NONBLOCK, so a link, a FIFO or a device in its place is refused at once, and the
walk keeps one descriptor per level (an explicit stack, no recursion): a tree deeper than `MAX_DEPTH` is
refused with `TreeTooDeep` rather than exhausting the daemon's descriptors or its stack.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from rloopd.errors import RloopdError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
MAX_DEPTH = 256


class TreeTooDeep(RloopdError):
    """A tree with directories nested deeper than MAX_DEPTH: no snapshot takes it."""


def open_dir(name: str | Path, dir_fd: int | None = None) -> int | None:
    """A descriptor of the directory `name` (relative to `dir_fd`), or None if it is not one (any more)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES):
            return None
        raise


def _scan(fd: int, skip: frozenset[str]) -> tuple[list[str], list[tuple[str, os.stat_result]]]:
    dirs, others = [], []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            if stat.S_ISDIR(st.st_mode):
                if entry.name not in skip:
                    dirs.append(entry.name)
            else:
                others.append((entry.name, st))
    return sorted(dirs), sorted(others, key=lambda x: x[0])


def walk(root: Path, skip_dirs: frozenset[str] = frozenset()) -> Iterator[tuple[str, int, list[tuple[str, os.stat_result]]]]:
    """(relative directory, its descriptor, [(name, lstat) of its entries that are not directories]) for each
    directory under `root`, top-down, in name order; directories named in `skip_dirs` are not entered. The
    descriptor is valid until the next step. Nothing if `root` is not a directory."""
    top = open_dir(root)
    if top is None:
        return
    stack: list[tuple[str, int, list[str]]] = []
    try:
        dirs, others = _scan(top, skip_dirs)
        stack.append((".", top, dirs[::-1]))
        yield ".", top, others
        while stack:
            rel, fd, pending = stack[-1]
            if not pending:
                os.close(fd)
                stack.pop()
                continue
            name = pending.pop()
            sub = open_dir(name, fd)
            if sub is None:
                continue  # swapped for a link, a file or a FIFO since the scan: not a directory to enter
            child = name if rel == "." else f"{rel}/{name}"
            if len(stack) >= MAX_DEPTH:
                os.close(sub)
                raise TreeTooDeep(f"{root}: directories nested deeper than {MAX_DEPTH} levels ({child[:200]}...)")
            dirs, others = _scan(sub, skip_dirs)
            stack.append((child, sub, dirs[::-1]))
            yield child, sub, others
    finally:
        for _, fd, _ in stack:
            os.close(fd)


def remove(dir_fd: int, name: str) -> None:
    """Remove the entry `name` of the directory `dir_fd`, a directory with everything in it, never following a
    link, however deep (one descriptor per level: depth is bounded by the process's descriptor limit)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        _unlink(dir_fd, name)
        return
    top = open_dir(name, dir_fd)
    if top is None:  # swapped for a link or a file meanwhile
        _unlink(dir_fd, name)
        return
    stack: list[tuple[int, str, int]] = [(dir_fd, name, top)]  # (parent, name in it, own descriptor)
    try:
        while stack:
            _, _, fd = stack[-1]
            entered = False
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        continue
                    sub = open_dir(entry.name, fd) if is_dir else None
                    if sub is None:
                        _unlink(fd, entry.name)
                        continue
                    stack.append((fd, entry.name, sub))
                    entered = True
                    break
            if entered:
                continue
            parent, own, fd = stack.pop()
            os.close(fd)
            try:
                os.rmdir(own, dir_fd=parent)
            except FileNotFoundError:
                pass
    finally:
        for _, _, fd in stack:
            os.close(fd)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:  # a directory put there since: removed as one
        remove(dir_fd, name)


def prune_empty(root: Path) -> None:
    """Remove the empty directories under `root` (not `root`), deepest first, never following a link."""
    top = open_dir(root)
    if top is None:
        return
    stack: list[tuple[int | None, str, int, list[str]]] = [(None, ".", top, _scan(top, frozenset())[0][::-1])]
    try:
        while stack:
            parent, name, fd, pending = stack[-1]
            if pending:
                child = pending.pop()
                sub = open_dir(child, fd)
                if sub is not None:
                    if len(stack) >= MAX_DEPTH:
                        os.close(sub)
                        continue
                    stack.append((fd, child, sub, _scan(sub, frozenset())[0][::-1]))
                continue
            stack.pop()
            os.close(fd)
            if parent is not None:
                try:
                    os.rmdir(name, dir_fd=parent)  # only an empty one goes
                except OSError:
                    pass
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)
