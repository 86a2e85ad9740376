"""Live program.md: watch the directories of the program files live runs follow, and record each change.

Editors save by writing a temporary file and renaming it over the old one, so the watcher watches the
directory, not the file. A change appends `program.changed` (the new text as a blob) to every live run
that follows that file and rewrites the run directory's program.md; a file that disappears or cannot be
read leaves the old version in force and appends `run.warned` once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

from rloopd.history import run_state
from rloopd.home import Home
from rloopd.log import NewEvent
from rloopd.memory.rundir import write_atomic

log = structlog.get_logger("rloopd.watch")
MAX_PROGRAM = 16 << 20  # bytes of program.md taken (a link to /dev/zero must not fill the daemon's memory)


class ProgramWatcher(threading.Thread):
    """Runs until `stopping` is set; `followed()` returns {program path: [run ids]} for the live runs."""

    def __init__(self, home_path: Path, followed: Callable[[], dict[Path, list[str]]], stopping: threading.Event,
                 open_home: Callable[[], Home] | None = None):
        super().__init__(name="program-watcher", daemon=True)
        self.home_path, self.followed, self.stopping = home_path, followed, stopping
        self.open_home = open_home or (lambda: Home.open(self.home_path))  # the daemon's: its size cap too
        self.warned: set[tuple[str, str]] = set()
        self.retry = False  # a change could not be recorded (a full disk, say): look again each second

    def run(self) -> None:
        with self.open_home() as home:
            while not self.stopping.is_set():
                files = self.followed()
                dirs = sorted({str(p.parent) for p in files if p.parent.is_dir()})
                if not dirs:
                    self.stopping.wait(1.0)
                    continue
                self.check(home, files)  # catch what changed while nothing watched
                for changes in watchfiles.watch(*dirs, stop_event=self.stopping, yield_on_timeout=True,
                                                rust_timeout=1000, debounce=200, raise_interrupt=False):
                    if changes or self.retry:
                        self.check(home, self.followed())
                    if self.followed().keys() != files.keys():
                        break  # the set of files changed: watch the new directories

    def check(self, home: Home, files: dict[Path, list[str]]) -> None:
        """Record what changed. A write that fails (the disk or the database full) must not end the watcher:
        the change is looked at again every second until it is recorded."""
        self.retry = False
        for path, runs in files.items():
            try:
                with open(path, "rb") as f:
                    text = f.read(MAX_PROGRAM + 1)
            except OSError as e:
                text, why = None, f"program file {path} cannot be read ({e.strerror}); the version in force stays"
            else:
                why = f"program file {path} is over {MAX_PROGRAM >> 20} MiB; the version in force stays" \
                    if len(text) > MAX_PROGRAM else None
            try:
                if why is not None:
                    self.warn(home, runs, path, why)
                    continue
                blob = home.blobs.put(text)
                for run in runs:
                    self.record(home, run, path, blob)
            except Exception as e:  # noqa: BLE001 - retried; the daemon's log says why meanwhile
                self.retry = True
                log.warning("program change not recorded yet", path=str(path), error=str(e))

    def record(self, home: Home, run: str, path: Path, blob: str) -> None:
        state = run_state(home.log, run)
        if state.program_blob == blob or state.status != "running" or state.program_path != str(path):
            return  # unchanged, not live, or the run follows another file now (`rloopd program`)
        home.log.append(run, [NewEvent("program.changed", {"program_blob": blob, "source": "live-edit",
                                                           "path": str(path)})])
        write_atomic(home.run_dir(run) / "program.md", home.blobs.get(blob), 0o444)
        self.warned = {w for w in self.warned if w[0] != run}
        log.info("program changed", run=run, path=str(path))

    def warn(self, home: Home, runs: list[str], path: Path, message: str) -> None:
        for run in runs:
            if (run, message) not in self.warned:
                home.log.append(run, [NewEvent("run.warned", {"about": "program", "message": message})])
                self.warned.add((run, message))  # once recorded: a failed append is tried again
                log.warning("program unreadable", run=run, path=str(path))
