"""Where runtime state lives: resolving the home directory and opening what is in it.

The home is `--home`, else `$RLOOPD_HOME`, else `$XDG_STATE_HOME/rloopd`, else `~/.local/state/rloopd`
(under systemd, `StateDirectory=rloopd` sets RLOOPD_HOME). It holds `events.db`, `blobs/`, `git/`
(workspace snapshots) and `runs/<run>/`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from rloopd.blobs import BlobStore
from rloopd.errors import HomeError
from rloopd.log import EventLog
from rloopd.snapshots import Snapshots


def default_home() -> Path:
    if os.environ.get("RLOOPD_HOME"):
        return Path(os.environ["RLOOPD_HOME"])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "rloopd"


@dataclass(eq=False)
class Home:
    path: Path
    log: EventLog
    blobs: BlobStore

    @classmethod
    def open(cls, path: Path | None = None, *, create: bool = True, synchronous: str = "FULL") -> Home:
        """Open the home at `path` (or the default); with `create`, make it if it does not exist."""
        path = Path(path) if path is not None else default_home()
        path = path.expanduser().absolute()
        db = path / "events.db"
        if not create and not db.exists():
            raise HomeError(f"{path}: no rloopd home here (no events.db); create one by running a command that writes")
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "blobs").mkdir(exist_ok=True)
        except OSError as e:
            raise HomeError(f"{path}: cannot create the home: {e.strerror}") from None
        # SQLite needs write access to read a WAL log too (it maps the -shm file), so every command checks it.
        for p in (path, db, path / "events.db-wal", path / "events.db-shm"):
            if p.exists() and not os.access(p, os.R_OK | os.W_OK):
                raise HomeError(f"{p}: the home is not writable by this user (rloopd needs read and write access)")
        log = EventLog.open(db, synchronous=synchronous, create=create)
        return cls(path, log, BlobStore(path / "blobs"))

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Home:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_dir(self, run_id: str) -> Path:
        return self.path / "runs" / run_id

    @functools.cached_property
    def snapshots(self) -> Snapshots:
        return Snapshots(self.path / "git")
