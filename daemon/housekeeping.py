"""Housekeeping that keeps the log whole: archiving finished runs and collecting blobs nobody needs.

`archive_run` appends `run.archived`: the run leaves `rloopd status` (unless `--all`) and stays verifiable
(its events, blobs, commits and run directory are kept). `collect` removes two kinds of blob and records
what it removed, and under which rule, as `blobs.collected` in the `home` stream, so that `rloopd audit`
tells a collected blob from a lost one:

- checkpoints outside the retention policy: every run keeps its best checkpoint and its last K
  (K = `keep_last`; an archived run keeps only its best). A checkpoint any run's history still retains
  (a fork's best may be its parent's) is kept.
- orphans: blobs no event names, older than `orphan_age` seconds. A blob is written before the event that
  names it, so a young orphan may be one a live writer is about to name; the age keeps gc safe beside a
  running daemon.

Frozen files, program versions, diffs, training logs and notes are never removed: replay, re-execution and
export need them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rloopd import events as ev
from rloopd.errors import RloopdError
from rloopd.history import history, run_state
from rloopd.home import Home
from rloopd.log import NewEvent
from rloopd.memory.state import fold

DEFAULT_KEEP_LAST = 3
DEFAULT_ORPHAN_AGE = 3600.0
ARCHIVABLE = ("finished", "stopped", "failed")


class NotArchivable(RloopdError):
    pass


def archive_run(home: Home, run: str, reason: str = "", request: str | None = None) -> str:
    """Append `run.archived` to a run that is finished, stopped or failed; returns its status afterwards."""
    if request and home.log.stream_of(request):
        return "archived"
    state = run_state(home.log, run)
    if state.status == "archived":
        return "archived"
    if state.status not in ARCHIVABLE:
        raise NotArchivable(f"run {run} is {state.status}: only a finished, stopped or failed run can be archived "
                            f"(stop it first: rloopd stop {run})")
    home.log.append(run, [NewEvent("run.archived", {"by": "cli", "reason": reason},
                                   **({"id": request} if request else {}))], expected_n=state.position + 1)
    return "archived"


@dataclass
class Collection:
    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    checkpoints: int = 0
    orphans: int = 0
    kept_checkpoints: int = 0
    rule: str = ""
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"removed": len(self.removed), "bytes_freed": self.bytes_freed, "checkpoints": self.checkpoints,
                "orphans": self.orphans, "kept_checkpoints": self.kept_checkpoints, "rule": self.rule,
                "dry_run": self.dry_run, "digests": self.removed}


def stored_blobs(home: Home) -> Iterator[tuple[str, Path]]:
    root = home.blobs.root / "sha256"
    if not root.is_dir():
        return
    for sub in sorted(root.iterdir()):
        if sub.is_dir() and len(sub.name) == 2:
            for f in sorted(sub.iterdir()):
                if not f.name.startswith(".tmp-"):
                    yield sub.name + f.name, f


def collect(home: Home, keep_last: int = DEFAULT_KEEP_LAST, orphan_age: float = DEFAULT_ORPHAN_AGE,
            dry_run: bool = False, request: str | None = None) -> Collection:
    """Remove what no event needs under the retention policy and record it (unless `dry_run`)."""
    if keep_last < 0:
        raise RloopdError(f"--keep-last {keep_last}: must be 0 or more")
    if orphan_age < 0:
        raise RloopdError(f"--orphan-age {orphan_age}: must be 0 or more")
    rule = f"best and last {keep_last} checkpoints per run (archived runs: best only); orphans older than " \
           f"{orphan_age:g} s"
    result = Collection(rule=rule, dry_run=dry_run)
    if request and home.log.stream_of(request):
        return result
    named, checkpoints, retained = set(), set(), set()  # named: by any event other than checkpoint.saved
    home.log.conn.execute("BEGIN")  # one consistent reading of the log
    try:
        for e in home.log.read():
            if e.type == "checkpoint.saved":
                checkpoints.add(e.data["blob"])
            else:
                refs = ev.blob_refs(e.data)
                warm = e.data.get("warm_start_blob") if e.type == "experiment.started" else None
                if warm:  # a checkpoint offered to a warm start is still a checkpoint: retention decides
                    checkpoints.add(warm)
                    refs = [r for r in refs if r != warm]
                named.update(refs)
        for created in home.log.runs():
            events = history(home.log, created.stream)
            state = fold(events)
            saved = [e.data["blob"] for e in events if e.type == "checkpoint.saved"]
            keep = 0 if state.status == "archived" else keep_last
            retained.update(saved[len(saved) - keep:] if keep else [])
            if state.checkpoint_blob:
                retained.add(state.checkpoint_blob)
    finally:
        home.log.conn.execute("COMMIT")
    result.kept_checkpoints = len(checkpoints & retained)
    now = time.time()
    doomed: list[tuple[str, Path, int]] = []
    for digest, path in stored_blobs(home):
        st = path.stat()
        if digest in named:
            continue
        if digest in checkpoints:
            if digest in retained:
                continue
            result.checkpoints += 1
        elif now - st.st_mtime > orphan_age:
            result.orphans += 1
        else:
            continue
        doomed.append((digest, path, st.st_size))
    result.removed = [d for d, _, _ in doomed]
    result.bytes_freed = sum(size for _, _, size in doomed)
    if dry_run or not doomed:
        return result
    # The record comes first: a crash after it leaves blobs that audit already knows may be gone; a crash
    # before it removes nothing.
    home.log.append("home", [NewEvent("blobs.collected", {"removed": result.removed, "rule": rule,
                                                          "bytes_freed": result.bytes_freed},
                                      **({"id": request} if request else {}))])
    for _, path, _ in doomed:
        path.unlink(missing_ok=True)
    return result
