"""The sandbox command prefix that confines training: bubblewrap where present, a run's own unprivileged uid.

A prefix is a list of argv words put in front of a child's command by the lab's judge (DESIGN section 6).
With bubblewrap: every namespace unshared (no network), all capabilities dropped, the filesystem
read-only, the home and the lab directory hidden behind empty tmpfs mounts (so neither the event log, the
secrets, other runs nor the private frozen files are visible), and only the experiment's scratch root
`{base}` writable. When the daemon runs as root, `setpriv` then switches to the run's own uid, so process
and memory limits bind and runs cannot read each other's files. Without bubblewrap the uid switch alone
is used (`setpriv`), and without root nothing at all (`none`); `run.created` records which.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rloopd.errors import RloopdError
from rloopd.fstree import walk

UID_RANGE = (61000, 61999)  # the uids runs are given, one each, lowest free first
KINDS = ("auto", "bwrap", "setpriv", "none")


class SandboxError(RloopdError):
    """A sandbox kind that does not exist or cannot work here."""


@dataclass(frozen=True)
class Sandbox:
    kind: str  # "bwrap", "setpriv" or "none"
    prefix: list[str]
    uid: int | None


def allocate_uid(taken: set[int], uid_range: tuple[int, int] = UID_RANGE) -> int:
    """The lowest uid of the range that no other run holds, so that runs cannot read or starve each other."""
    lo, hi = uid_range
    for uid in range(lo, hi + 1):
        if uid not in taken:
            return uid
    raise SandboxError(f"every uid in {lo}-{hi} is taken by a run; archive runs or widen the range")


def run_uid(created: dict) -> int | None:
    """The uid a run's sessions and training children run as: its own (`uid` on run.created) when the daemon
    is root and the run has a sandbox, else None (they run as the daemon's own user)."""
    if os.geteuid() != 0 or created.get("sandbox", "auto") == "none":
        return None
    return created.get("uid")


def resolve_kind(kind: str) -> str:
    """What `auto` means on this machine, and a one-line error for a kind that does not exist."""
    if kind not in KINDS:
        raise SandboxError(f"--sandbox {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "auto":
        return "bwrap" if shutil.which("bwrap") else ("setpriv" if os.geteuid() == 0 else "none")
    if kind == "bwrap" and not shutil.which("bwrap"):
        raise SandboxError("--sandbox bwrap: bubblewrap (bwrap) is not installed")
    if kind == "setpriv" and os.geteuid() != 0:
        raise SandboxError("--sandbox setpriv: switching to a run's uid needs the daemon to run as root")
    return kind


def _within(path: Path, parent: Path) -> bool:
    try:
        path.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def _drop_to(uid: int) -> list[str]:
    """setpriv to a real unprivileged uid with no capabilities left, not even in the bounding set."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs"]


def _reexpose(keep: Path, hidden: Path) -> list[str]:
    """bwrap words that make `keep` visible again under a hidden directory, parents traversable (0755)."""
    words = []
    for parent in reversed(keep.relative_to(hidden).parents[:-1]):
        words += ["--perms", "0755", "--dir", str(hidden / parent)]
    return words + ["--ro-bind", str(keep), str(keep)]


def training_sandbox(uid: int | None, *, hide: list[Path], scratch: Path | None = None,
                     kind: str = "auto") -> Sandbox:
    """The prefix for a run's training children. `hide` lists directories to mask (home, lab).

    `uid` is the run's own (see `allocate_uid`); it is used only when the daemon runs as root.
    `kind`: "auto" (bwrap if installed, else setpriv as root, else none), or one of those names.
    The daemon user's own home directory and /tmp are always hidden too (credentials, caches). `scratch`
    (the run's scratch root, where the judge makes `{base}`) stays visible read-only with traversable
    parents, so that bwrap can bind `{base}` writable inside it.
    """
    kind = resolve_kind(kind)
    root = os.geteuid() == 0
    uid = uid if root else None
    if kind == "none" or (kind == "setpriv" and uid is None):
        return Sandbox("none", [], None)
    if kind == "setpriv":
        return Sandbox("setpriv", _training_limits() + _drop_to(uid), uid)
    args = [shutil.which("bwrap") or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    if root:  # kept only for setpriv's switch to the run's uid, which then drops them for good
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        args += ["--unshare-user"]
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for dev in sorted(Path("/dev").glob("nvidia*")):
        args += ["--dev-bind", str(dev), str(dev)]
    keep = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parent.parent)}
    if scratch is not None:
        keep.add(Path(scratch).resolve())
    hidden = sorted({Path(d).resolve() for d in [*hide, Path.home(), Path("/tmp")] if Path(d).exists()},
                    key=lambda p: len(p.parts))
    for d in hidden:
        if any(_within(d, h) and d != h for h in hidden):
            continue  # already hidden by a parent
        args += ["--tmpfs", str(d)]
        for k in sorted(keep):
            if _within(k, d) and k != d:
                args += _reexpose(k, d)
    args += ["--bind", "{base}", "{base}", "--chdir", "{base}", "--"]
    return Sandbox("bwrap", args + (_training_limits() + _drop_to(uid) if uid else []), uid)


TRAINING_PROCESSES = 4096  # RLIMIT_NPROC of a run's uid while it trains: threads count (torch, data loaders)


def _training_limits() -> list[str]:
    """A fork bomb in train.py stops at TRAINING_PROCESSES (the run's uid alone: as root, before the switch)."""
    return [shutil.which("prlimit") or "prlimit", f"--nproc={TRAINING_PROCESSES}", "--"] if shutil.which("prlimit") \
        else []


@dataclass(frozen=True)
class SessionLimits:
    """Per-session resource limits (RLIMITs, set by prlimit before the uid switch, so they bind the run's uid)."""

    processes: int = 256
    memory_mb: int = 8192  # address space
    file_mb: int = 1024  # largest file the agent may write


def _limits(limits: SessionLimits) -> list[str]:
    return [shutil.which("prlimit") or "prlimit", f"--nproc={limits.processes}",
            f"--as={limits.memory_mb << 20}", f"--fsize={limits.file_mb << 20}", "--"]


def session_sandbox(uid: int | None, *, home: Path, run_dir: Path, session_dir: Path, kind: str = "auto",
                    limits: SessionLimits = SessionLimits(), expose: tuple[Path, ...] = (),
                    hide: tuple[Path, ...] = ()) -> Sandbox:
    """The prefix for an agent session (DESIGN section 7): the filesystem read-only except the run's
    `workspace/`, `memory/notes.md`, `memory/artifacts/` and `session_dir` (its HOME, its temporary
    directory and its socket to the daemon); of the home only its own run directory is visible; all
    capabilities dropped and, as root, the run's own uid; network kept (the agent calls its model).
    `expose` lists files shown read-only although they sit in a hidden directory (the agent's own script);
    `hide` more directories to mask (the lab: its private frozen files). No `--new-session`: the session's
    process group must include the agent, so that SIGTERM reaches it and the grace period means something
    (its stdin is /dev/null and it has no controlling terminal to inject into).
    `kind` as for `training_sandbox`; without bubblewrap the uid switch and the limits still apply as root.
    """
    kind = resolve_kind(kind)
    root = os.geteuid() == 0
    uid = uid if root else None
    tail = (_limits(limits) if shutil.which("prlimit") else []) + (_drop_to(uid) if uid else [])
    if kind == "none" or (kind == "setpriv" and uid is None):
        return Sandbox("none", tail if uid else [], None)
    if kind == "setpriv":
        return Sandbox("setpriv", tail, uid)
    args = [shutil.which("bwrap") or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--cap-drop", "ALL"]
    if root:
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        args += ["--unshare-user"]
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    run_dir, session_dir = Path(run_dir).resolve(), Path(session_dir).resolve()
    keep = {Path(p).resolve() for p in (sys.prefix, sys.base_prefix, Path(sys.executable).resolve().parent.parent)}
    keep |= _package_dirs()  # `rloopd submit` imports rloopd, which an editable install keeps in a checkout
    keep.add(run_dir)
    keep.add(session_dir)
    hidden = sorted({Path(d).resolve() for d in [home, *hide, Path.home(), Path("/tmp")] if Path(d).exists()},
                    key=lambda p: len(p.parts))
    for d in hidden:
        if any(_within(d, h) and d != h for h in hidden):
            continue
        args += ["--tmpfs", str(d)]
        for k in sorted(keep):
            if _within(k, d) and k != d:
                args += _reexpose(k, d)
    for shown in expose:
        shown = Path(shown).resolve()
        for d in hidden:
            if _within(shown, d) and not any(_within(shown, k) for k in keep):
                args += _reexpose(shown, d)
                break
    # memory/ as a whole (a bind of notes.md alone would keep the old file after the daemon replaces it);
    # its permissions still let the agent write only notes.md and artifacts/, which are its uid's.
    for writable in (run_dir / "workspace", run_dir / "memory", session_dir):
        args += ["--bind", str(writable), str(writable)]
    args += ["--chdir", str(run_dir), "--"]
    return Sandbox("bwrap", args + tail, uid)


def _package_dirs() -> set[Path]:
    import rloopd
    import rloopd.memory

    return {Path(rloopd.__file__).resolve().parent, Path(rloopd.memory.__file__).resolve().parent}


def give_to(uid: int | None, *paths: Path) -> None:
    """Make the agent's writable paths its own uid's (as root; the daemon writes them as root).

    The agent's processes may still run, so a directory may be swapped for a symlink while this walks:
    every chown is made relative to an open directory (`fstree.walk`) and never follows a link, so it
    cannot be steered outside the tree.
    """
    if uid is None or os.geteuid() != 0:
        return
    for top in paths:
        try:
            os.chown(top, uid, uid, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not top.is_dir() or top.is_symlink():
            continue
        for _, dirfd, _ in walk(top):
            for name in os.listdir(dirfd):  # its directories and the rest
                try:
                    os.chown(name, uid, uid, dir_fd=dirfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue


def _belongs(pid: int | str, uid: int) -> bool:
    """Whether `pid` is a live process (not a zombie) whose real or effective uid is `uid`."""
    try:
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
    except (OSError, ValueError):
        return False  # gone meanwhile
    return status.get("State", "").strip()[:1] not in ("Z", "X") and str(uid) in status.get("Uid", "").split()[:2]


def _kill(pid: int, uid: int) -> bool:
    """SIGKILL `pid` if it is still a process of `uid`. Through a pidfd, checked once it is open, so that a pid
    reused by another process since the scan is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfds (Linux before 5.3): a plain kill, with the pid-reuse race that implies
        fd = None
    try:
        if not _belongs(pid, uid):
            return False
        if fd is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd is not None:
            os.close(fd)


def kill_uid(uid: int, timeout: float = 5.0) -> int:
    """SIGKILL every process whose real (or effective) uid is `uid`, scanning /proc again until a scan finds
    none or `timeout` seconds pass; returns how many processes were killed.

    Every run has a uid of its own (`allocate_uid`), so this ends exactly what the run left behind. Without
    bubblewrap (sandbox `setpriv`) it is the only exact way: a process of the agent that calls `setsid` (or
    forks twice and calls it) leaves the session's process group and outlives the group kill, and the run's
    uid is all that still marks it (under bubblewrap the session's pid namespace ends with the agent). Call
    it only when nothing of the run may live: after a session, with no experiment in flight (the training
    children run as the same uid). Zombies are dead already and are passed over. Root and the daemon's own
    uid are refused. The uids are one per run *of a home*: runs of two homes on one machine that share a
    uid would end each other's processes (and could read each other's files anyway).
    """
    if uid in (0, os.getuid(), os.geteuid()):
        raise SandboxError(f"kill_uid({uid}): not a run's own uid")
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        found = [int(p) for p in os.listdir("/proc") if p.isdigit() and _belongs(p, uid)]
        if not found:
            return len(killed)
        killed.update(pid for pid in found if _kill(pid, uid))
        if time.monotonic() > deadline:
            return len(killed)
        time.sleep(0.01)
