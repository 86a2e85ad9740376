"""One writer per home: an advisory lock held by the daemon, or by a foreground run when none serves."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from rloopd.errors import HomeBusy


class HomeLock:
    """`flock` on `<home>/rloopd.lock`; the file says who holds it (pid and role) for the error message.

    The kernel drops the lock when the holder dies, so a SIGKILLed daemon never leaves a stale lock.
    """

    def __init__(self, home: Path):
        self.path = Path(home) / "rloopd.lock"
        self.fd: int | None = None

    def acquire(self, role: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HomeBusy(f"{self.path.parent}: already in use by {holder(self.path) or 'another process'}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {role}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def holder(path: Path) -> str | None:
    """`pid N (role)` from the lock file, if anyone wrote it."""
    try:
        pid, _, role = path.read_text().strip().partition(" ")
    except OSError:
        return None
    return f"pid {pid} ({role})" if pid else None


def daemon_running(home: Path) -> bool:
    """Whether some process holds the home's lock right now (a daemon or a foreground run)."""
    path = Path(home) / "rloopd.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
