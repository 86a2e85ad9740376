"""Where runtime state lives: resolving the home directory, opening what is in it, and who may read it.

The home is `--home`, else `$RLOOPD_HOME`, else `$XDG_STATE_HOME/rloopd`, else `~/.local/state/rloopd`
(under systemd, `StateDirectory=rloopd` sets RLOOPD_HOME). It holds `events.db`, `blobs/`, `git/`
(workspace snapshots), `secrets/`, `labs/` (the judge's copies, private files included), `cache/`,
`runs/<run>/` (what the agent sees), `sessions/<run>/` (a session's HOME, tmp and socket) and `tmp/<run>/`
(experiment snapshots, the judge's private files and the children's scratch root).

Who may read it (DESIGN section 7). A run's agent and training children run as the run's own uid, which
is neither the daemon's user nor in its group; under bubblewrap the home is hidden from them anyway, but
under `setpriv` (root without bubblewrap) they see the real filesystem, so the modes are what keeps them
out. Other users lose every permission everywhere in the home; the owner and the home's group keep theirs
(the service's researchers reach the home through its group, ops/README.md):

- the home, `runs/`, `sessions/` and `tmp/`: other users may only pass through (`--x`, as root only, where
  run uids exist), so a run's uid reaches its own directories by name and can list none of them;
- everything else at the top (events.db and its -wal/-shm, blobs/, git/, labs/, cache/, secrets/, the lock
  and the control socket): nothing for other users;
- each run's `runs/<run>/` (mode 0750), `sessions/<run>/` and `tmp/<run>/` (0710): owned by the daemon's user
  with the run's uid as group (its uid is also its gid), so only that run gets in: it reads its run
  directory (program.md, frozen/, memory/, read-only as the daemon writes them) and passes through the
  other two to its HOME, tmp and socket and to the judge's scratch root `tmp/<run>/scratch/`, where its
  training children work. It writes nothing there itself: the paths it writes (workspace/, notes.md,
  artifacts/, the session's HOME and tmp) are given to its uid by the session driver (`give_to`), and the
  directories stay the daemon's, so it cannot rename its way out of the read-only files or plant a link
  the daemon would then write through. Without a run uid (the daemon not root, or sandbox `none`) these
  three lose only other users' permissions, like the rest.

The modes are set where a directory is made (`restrict`, `Home.secure_run`) and again on every open, so an
existing home is tightened when a daemon (or any command) next opens it.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from rloopd.blobs import BlobStore
from rloopd.config import cap_pages
from rloopd.errors import HomeError
from rloopd.log import EventLog
from rloopd.sandbox import run_uid
from rloopd.snapshots import Snapshots

PASSAGES = ("runs", "sessions", "tmp")  # a run's uid passes through these to its own directories
RUN_DIR_MODES = {"runs": 0o750, "sessions": 0o710, "tmp": 0o710}  # a run's own directory in each, as root


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
    def open(cls, path: Path | None = None, *, create: bool = True, synchronous: str = "FULL",
             max_db_mb: float | None = None) -> Home:
        """Open the home at `path` (or the default); with `create`, make it if it does not exist. With
        `max_db_mb`, this connection cannot grow events.db beyond it (the daemon's cap, rloopd.config)."""
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
        cap_pages(log.conn, max_db_mb)
        secure_home(path)
        return cls(path, log, BlobStore(path / "blobs"))

    def close(self) -> None:
        self.log.close()

    def __enter__(self) -> Home:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_dir(self, run_id: str) -> Path:
        return self.path / "runs" / run_id

    def secure_run(self, run_id: str, created: dict) -> None:
        """Make `runs/<run>/`, `sessions/<run>/` and `tmp/<run>/` (if missing) such that only the run's own
        uid (and the daemon's user) gets in; see the module docstring. Cheap and idempotent: called where a
        run is created and whenever one is driven."""
        uid = run_uid(created)
        for top, mode in RUN_DIR_MODES.items():
            parent = self.path / top
            parent.mkdir(exist_ok=True)
            restrict(parent, passage=True)
            path = parent / run_id
            path.mkdir(exist_ok=True)
            if uid is None:
                restrict(path)
                continue
            os.chown(path, -1, uid, follow_symlinks=False)
            os.chmod(path, mode)

    @functools.cached_property
    def snapshots(self) -> Snapshots:
        snapshots = Snapshots(self.path / "git")
        restrict(self.path / "git")  # made by the first snapshot, after the open tightened the rest
        return snapshots


def restrict(path: Path, *, passage: bool = False) -> None:
    """Take every permission from other users (the owner and the group keep theirs); with `passage`, leave
    them only passing through the directory, and only as root (where run uids exist that must pass). A link
    is left alone, and so is a path this user may not change (a home shared through its group)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode) & ~0o007
    if passage and stat.S_ISDIR(st.st_mode) and os.geteuid() == 0:
        mode |= 0o001
    if mode != stat.S_IMODE(st.st_mode):
        try:
            os.chmod(path, mode)
        except PermissionError:
            pass


def private_dir(path: Path) -> Path:
    """`path` made if missing (parents included) and closed to other users."""
    path.mkdir(parents=True, exist_ok=True)
    restrict(path)
    return path


def secure_home(path: Path) -> None:
    """Set the modes of the module docstring on the home and everything at its top (not the runs' own
    directories: `Home.secure_run`)."""
    restrict(path, passage=True)
    for entry in os.scandir(path):
        restrict(Path(entry.path), passage=entry.name in PASSAGES)
