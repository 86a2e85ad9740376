"""Export a run to one self-contained archive; import one into another home, verified before anything is written.

The archive is a gzipped tar (format `rloopd-archive`, version `FORMAT_VERSION`) of:

- `archive.json`: the format and its version, the rloopd that wrote it, the run, every stream it holds with
  its number of events and head hash, the checkpoints `rloopd gc` had collected (named, but absent), and
  the sha256 of every other member;
- `events.jsonl`: the run's history as stored, one event per line (id, stream, n, type, v, at, data, prev,
  hash): each ancestor's prefix up to its fork position, then the run's own events;
- `blobs/<sha256>`: every blob those events name;
- `snapshots.bundle`: a git bundle of every commit they name.

Import is for a reviewer who trusts the archive no more than the person who sent it: every member digest,
every event's canonical bytes and chain hash (fork boundaries included), the head hashes, every blob and
every commit are checked first, and only then is anything written; a refused archive leaves the home as it
was. The events keep their ids, positions, times and hashes (only `seq` is local), so `rloopd replay` and
`rloopd audit` give the same verdict here as where the run was made, and the head hashes a sender publishes
can be checked with `--expect`. A `run.imported` event in the `home` stream records what was added: a daemon
does not drive an imported run (forking it continues it here).
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import re
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from rloopd import __version__
from rloopd import events as ev
from rloopd.audit import collected_blobs
from rloopd.errors import (
    ArchiveInvalid,
    ArchiveUnreadable,
    AuditFailed,
    ImportConflict,
    RloopdError,
    RunNotFound,
    StaleRun,
)
from rloopd.history import history, lineage
from rloopd.home import Home
from rloopd.log import EventLog, NewEvent, canonical_event, canonical_json, chain_hash
from rloopd.memory import experiments as ex
from rloopd.memory.rundir import MemoryFiles, materialize_frozen, project_memory
from rloopd.memory.state import fold
from rloopd.snapshots import SnapshotError, Snapshots

FORMAT = "rloopd-archive"
FORMAT_VERSION = 1
FIELDS = ("id", "stream", "n", "type", "v", "at", "data", "prev", "hash")  # also the order of an insert row
MEMBER = re.compile(r"^(archive\.json|events\.jsonl|snapshots\.bundle|blobs/[0-9a-f]{64})$")
DIGEST = re.compile(r"^[0-9a-f]{64}$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 1 << 20


class StreamHead(BaseModel):
    stream: str
    events: int
    head: str


class ArchiveDoc(BaseModel):
    """archive.json (fields a later v1 adds are ignored, so v1 readers keep reading v1 archives)."""

    format: str
    version: int
    rloopd: str = ""
    run: str
    name: str = ""
    streams: list[StreamHead]
    collected: list[str] = []
    members: dict[str, str]


@dataclass
class Checked:
    """What a verified events.jsonl holds: rows to insert, per stream, and what the events name."""

    rows: dict[str, list[tuple]] = field(default_factory=dict)  # stream -> rows in n order
    heads: dict[str, str] = field(default_factory=dict)
    first: dict[str, dict[str, Any]] = field(default_factory=dict)  # stream -> its run.created payload
    blobs: dict[str, tuple[str, int, set[str]]] = field(default_factory=dict)  # digest -> (stream, n, types)
    commits: dict[str, tuple[str, int]] = field(default_factory=dict)  # commit -> (stream, n) first naming it


class _BadEvent(Exception):
    def __init__(self, line: int, stream: str | None, n: int | None, why: str, newer: bool = False):
        where = f"line {line}" + (f" (run {stream} n={n})" if stream is not None else "")
        super().__init__(f"events.jsonl {where}: {why}")
        self.newer = newer


def _commits_named(type_: str, data: dict[str, Any]) -> Iterator[str]:
    """The snapshot commits an event names: what replay and a fork need to find in the home's repository."""
    keys = {"experiment.started": ("commit",), "run.created": ("base_commit",),
            "experiment.decided": ("best_commit",), "run.finished": ("best_commit",)}.get(type_, ())
    yield from (data[k] for k in keys if data.get(k))


def _check_events(lines: Iterable[str]) -> Checked:
    """Parse and verify a history line by line: shape, canonical bytes, chain hash, positions, the fork link,
    and that every type and payload version is known. Raises `_BadEvent` naming the first bad line."""
    out = Checked()
    last: dict[str, tuple[int, str]] = {}
    ids: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise _BadEvent(lineno, None, None, f"not JSON ({e})") from None
        except RecursionError:
            raise _BadEvent(lineno, None, None, "not JSON (arrays or objects nested too deeply)") from None
        if not isinstance(obj, dict) or set(obj) != set(FIELDS) or not all(
                isinstance(obj[k], str) for k in ("id", "stream", "type", "at", "prev", "hash")) or not all(
                type(obj[k]) is int for k in ("n", "v")) or not isinstance(obj["data"], dict):
            raise _BadEvent(lineno, None, None, f"not an event (its fields must be {', '.join(FIELDS)})")
        stream, n, type_, v, data = obj["stream"], obj["n"], obj["type"], obj["v"], obj["data"]

        def bad(why: str, newer: bool = False, line: int = lineno, stream: str = stream, n: int = n) -> _BadEvent:
            return _BadEvent(line, stream, n, why, newer)

        try:
            text = canonical_json(data)
        except ValueError as e:
            raise bad(f"data has no canonical form ({e})") from None
        if chain_hash(obj["prev"], canonical_event(stream, n, type_, v, obj["at"], text)) != obj["hash"]:
            raise bad("hash does not match its contents")
        known = ev.TYPES.get(type_)  # the hash is good: what is unknown was written by a newer rloopd
        if known is None:
            raise bad(f"unknown event type {type_!r} (written by a newer rloopd?); upgrade rloopd", newer=True)
        if v > known[0]:
            raise bad(f"{type_} v{v} is newer than this rloopd supports (v{known[0]}); upgrade rloopd", newer=True)
        try:
            ev.decode(type_, v, data)
            now = ev.upcast(type_, v, data)
        except Exception as e:  # noqa: BLE001 - a payload that does not decode is a verification failure
            raise bad(str(e)) from None
        if obj["id"] in ids:
            raise bad(f"event id {obj['id']} appears twice")
        ids.add(obj["id"])
        before = last.get(stream)
        if before is None:
            if n != 0 or type_ != "run.created":
                raise bad("a stream must start with run.created at n=0 (events are missing)")
            parent = now.get("parent")
            link = ""
            if parent:
                at_fork = last.get(parent["run"])
                if at_fork is None or at_fork[0] != parent["n"]:
                    raise bad(f"forks run {parent['run']} at n={parent['n']}, which the lines before it do not end at")
                link = at_fork[1]
            out.first[stream] = now
            out.rows[stream] = []
        else:
            if n != before[0] + 1:
                raise bad(f"expected n={before[0] + 1} (an event is missing or out of order)")
            link = before[1]
        if obj["prev"] != link:
            raise bad("prev does not match the hash of the event before it")
        out.rows[stream].append((obj["id"], stream, n, type_, v, obj["at"], text, obj["prev"], obj["hash"]))
        last[stream] = (n, obj["hash"])
        out.heads[stream] = obj["hash"]
        for ref in ev.blob_refs(now):
            if not DIGEST.match(ref):
                raise bad(f"names {ref!r}, which is not a blob digest")
            out.blobs.setdefault(ref, (stream, n, set()))[2].add(type_)
        for commit in _commits_named(type_, now):
            if not COMMIT.match(commit):
                raise bad(f"names {commit!r}, which is not a commit id")
            out.commits.setdefault(commit, (stream, n))
    return out


# --- export ----------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def export_run(home: Home, run_ref: str, dest: Path) -> dict[str, Any]:
    """Write `run_ref`'s archive to `dest` (replaced whole, never left half-written) and return a summary.

    The events are read in one read transaction, so a live run exports as a consistent cut of its log.
    The history is verified as it is written, and every blob and commit must be in this home: an archive
    that would not import is never made (rloopd audit names what is wrong).
    """
    log = home.log
    run = log.resolve(run_ref)
    dest = Path(dest).absolute()
    log.conn.execute("BEGIN")
    try:
        first = next(log.read(run, until_n=0), None)
        if first is None or first.type != "run.created":
            raise RunNotFound(f"{run_ref!r} is not a run: only runs can be exported")
        segments = [(x["run"], x["n"]) for x in lineage(log, run)] + [(run, None)]
        lines = []
        for stream, until in segments:  # the stored rows, not upcast: the bytes the hashes were made of
            for row in log.conn.execute(f"SELECT {', '.join(FIELDS)} FROM events WHERE stream = ? AND n <= ? "
                                        "ORDER BY n", (stream, (1 << 62) if until is None else until)):
                obj = dict(zip(FIELDS, row, strict=True))
                obj["data"] = json.loads(obj["data"])
                lines.append(canonical_json(obj))
        gone = collected_blobs(log)
    finally:
        log.conn.execute("COMMIT")
    try:
        checked = _check_events(lines)
    except _BadEvent as e:
        raise AuditFailed(f"cannot export run {run}: its log does not verify: {e} (see rloopd audit)") from None
    collected = []
    for digest, (stream, n, types) in sorted(checked.blobs.items()):
        if home.blobs.exists(digest):
            why = home.blobs.verify(digest)
            if why:
                raise AuditFailed(f"cannot export run {run}: {why}")
        elif digest in gone and types == {"checkpoint.saved"}:
            collected.append(digest)
        else:
            raise AuditFailed(f"cannot export run {run}: blob {digest} (named by run {stream} n={n}) is missing "
                              f"from {home.blobs.root}")
    commits = sorted(checked.commits)
    missing = home.snapshots.missing(commits)
    if missing:
        commit = missing[0]
        stream, n = checked.commits[commit]
        raise AuditFailed(f"cannot export run {run}: commit {commit} (named by run {stream} n={n}) is missing "
                          "from the home's snapshot repository")
    blobs = [d for d in sorted(checked.blobs) if d not in collected]
    with tempfile.TemporaryDirectory(prefix="rloopd-export-") as tmp:
        stage = Path(tmp)
        (stage / "events.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        home.snapshots.bundle(stage / "snapshots.bundle",
                              {f"refs/rloopd/{checked.commits[c][0]}/{c}": c for c in commits})
        members = {"events.jsonl": _file_sha256(stage / "events.jsonl"),
                   "snapshots.bundle": _file_sha256(stage / "snapshots.bundle")}
        members.update({f"blobs/{d}": d for d in blobs})  # verified above: a blob's name is its sha256
        doc = ArchiveDoc(format=FORMAT, version=FORMAT_VERSION, rloopd=__version__, run=run,
                         name=checked.first[run].get("name", ""), collected=collected, members=members,
                         streams=[StreamHead(stream=s, events=len(r), head=checked.heads[s])
                                  for s, r in checked.rows.items()])
        part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        try:
            with open(part, "wb") as f:
                with tarfile.open(fileobj=f, mode="w:gz") as tar:
                    _add_bytes(tar, "archive.json", (json.dumps(doc.model_dump(), indent=1) + "\n").encode())
                    tar.add(stage / "events.jsonl", "events.jsonl", filter=_plain)
                    for d in blobs:
                        tar.add(home.blobs.path(d), f"blobs/{d}", filter=_plain)
                    tar.add(stage / "snapshots.bundle", "snapshots.bundle", filter=_plain)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, dest)
        except OSError as e:
            raise RloopdError(f"{dest}: cannot write the archive there ({e.strerror or e})") from None
        finally:
            part.unlink(missing_ok=True)
    return {"file": str(dest), "bytes": dest.stat().st_size, "run": run, "name": doc.name,
            "events": sum(s.events for s in doc.streams), "streams": [s.model_dump() for s in doc.streams],
            "blobs": len(blobs), "collected": len(collected), "commits": len(commits)}


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A member as anyone's: no local user or group names go into an archive that is sent elsewhere."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


# --- import ----------------------------------------------------------------------------------------


def _unpack(src: Path, stage: Path) -> dict[str, str]:
    """Copy every member of the archive under `stage`, returning each one's sha256; nothing else is trusted."""
    digests: dict[str, str] = {}
    try:
        with tarfile.open(src, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not MEMBER.match(member.name):
                    raise ArchiveInvalid(f"archive {src}: unexpected member {member.name!r}")
                if member.name in digests:
                    raise ArchiveInvalid(f"archive {src}: member {member.name} appears twice")
                target = stage / member.name
                target.parent.mkdir(parents=True, exist_ok=True)
                h = hashlib.sha256()
                with tar.extractfile(member) as fin, open(target, "wb") as fout:
                    while chunk := fin.read(CHUNK):
                        h.update(chunk)
                        fout.write(chunk)
                digests[member.name] = h.hexdigest()
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError) as e:
        lines = str(e).splitlines()  # tarfile's "r:*" says why each compression failed, a line each
        why = next((x.removeprefix("- method gz: ") for x in lines if x.startswith("- method gz: ")), lines[0] if lines else "")
        raise ArchiveUnreadable(f"archive {src}: truncated or not an rloopd archive ({why or type(e).__name__})") from None
    except OSError as e:  # a missing file, a directory, no permission; gzip's BadGzipFile is one too
        raise ArchiveUnreadable(f"archive {src}: cannot read it ({e.strerror or e})") from None
    return digests


def _read_doc(src: Path, stage: Path, digests: dict[str, str]) -> ArchiveDoc:
    if "archive.json" not in digests:
        raise ArchiveUnreadable(f"archive {src}: not an rloopd archive (it has no archive.json)")
    try:
        raw = json.loads((stage / "archive.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ArchiveInvalid(f"archive {src}: archive.json is not JSON ({e})") from None
    except RecursionError:
        raise ArchiveInvalid(f"archive {src}: archive.json is not JSON (arrays or objects nested too deeply)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArchiveUnreadable(f"archive {src}: not an rloopd archive (archive.json names no {FORMAT} format)")
    version = raw.get("version")
    if type(version) is not int:
        raise ArchiveInvalid(f"archive {src}: archive.json has no format version")
    if version > FORMAT_VERSION:
        raise ArchiveUnreadable(f"archive {src}: archive format v{version} is newer than this rloopd supports "
                                f"(v{FORMAT_VERSION}); upgrade rloopd")
    try:
        return ArchiveDoc.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise ArchiveInvalid(f"archive {src}: archive.json: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _verify(src: Path, stage: Path, digests: dict[str, str], doc: ArchiveDoc, expect: dict[str, str]) -> Checked:
    """Everything an archive claims, checked against itself; raises naming the first thing that is not so."""
    def invalid(why: str) -> ArchiveInvalid:
        return ArchiveInvalid(f"archive {src}: {why}")

    listed, present = set(doc.members), set(digests) - {"archive.json"}
    if listed - present:
        raise invalid(f"{min(listed - present)} is listed in archive.json but missing from the archive")
    if present - listed:
        raise invalid(f"{min(present - listed)} is in the archive but not listed in archive.json")
    altered = sorted(name for name in present if digests[name] != doc.members[name])
    if altered:
        raise invalid(f"{altered[0]}: its sha256 does not match archive.json (the member was altered)")
    for name in ("events.jsonl", "snapshots.bundle"):
        if name not in present:
            raise invalid(f"it has no {name}")
    try:
        with open(stage / "events.jsonl", encoding="utf-8") as f:
            checked = _check_events(f)
    except UnicodeDecodeError as e:
        raise invalid(f"events.jsonl is not UTF-8 ({e})") from None
    except _BadEvent as e:
        if e.newer:
            raise ArchiveUnreadable(f"archive {src}: {e}") from None
        raise invalid(str(e)) from None
    recorded = {s.stream: s for s in doc.streams}
    if set(recorded) != set(checked.rows):
        raise invalid(f"archive.json lists streams {', '.join(sorted(recorded))}, events.jsonl holds "
                      f"{', '.join(sorted(checked.rows))}")
    for stream, rows in checked.rows.items():
        if recorded[stream].events != len(rows) or recorded[stream].head != checked.heads[stream]:
            raise invalid(f"stream {stream}: {len(rows)} events with head {checked.heads[stream]}, but archive.json "
                          f"records {recorded[stream].events} with head {recorded[stream].head}")
    for stream, head in expect.items():
        if checked.heads.get(stream) != head:
            raise invalid(f"stream {stream}: head hash {checked.heads.get(stream, '(absent)')} is not the expected {head}")
    lineage_of_run, run = set(), doc.run
    while run is not None:
        if run not in checked.rows:
            raise invalid(f"events.jsonl does not hold run {run}")
        lineage_of_run.add(run)
        parent = checked.first[run].get("parent")
        if parent and len(checked.rows[parent["run"]]) != parent["n"] + 1:
            raise invalid(f"run {parent['run']} must end at its fork position n={parent['n']}")
        run = parent["run"] if parent else None
    if set(checked.rows) - lineage_of_run:
        raise invalid(f"events.jsonl holds run {min(set(checked.rows) - lineage_of_run)}, which is not in run "
                      f"{doc.run}'s lineage")
    collected = set(doc.collected)
    for digest, (stream, n, types) in sorted(checked.blobs.items()):
        name = f"blobs/{digest}"
        if name in present:
            if digests[name] != digest:
                raise invalid(f"{name}: its bytes hash to {digests[name]}, not to its name (a swapped or altered blob)")
        elif digest not in collected or types != {"checkpoint.saved"}:
            raise invalid(f"blob {digest} (named by run {stream} n={n}) is missing from the archive")
    unnamed = sorted(name for name in present if name.startswith("blobs/") and name[6:] not in checked.blobs)
    if unnamed:
        raise invalid(f"{unnamed[0]} is not named by any event")
    return checked


def _check_bundle(src: Path, stage: Path, checked: Checked, scratch: Snapshots) -> None:
    try:
        scratch.unbundle(stage / "snapshots.bundle")
    except SnapshotError as e:
        raise ArchiveInvalid(f"archive {src}: snapshots.bundle does not verify: {e}") from None
    missing = scratch.missing(sorted(checked.commits))
    if missing:
        commit = missing[0]
        stream, n = checked.commits[commit]
        raise ArchiveInvalid(f"archive {src}: commit {commit} (named by run {stream} n={n}) is not in "
                             "snapshots.bundle")


def _plan(src: Path, log: EventLog, checked: Checked) -> list[tuple]:
    """The rows this home lacks. A stream it holds already must agree with the archive wherever both have
    events (a parent imported before, the same archive twice); one that goes another way is a conflict."""
    new: list[tuple] = []
    for stream, rows in checked.rows.items():
        here = log.conn.execute("SELECT n, id, hash FROM events WHERE stream = ? AND n < ? ORDER BY n",
                                (stream, len(rows))).fetchall()
        for i, (n, id_, hash_) in enumerate(here):
            if (n, id_, hash_) != (i, rows[i][0], rows[i][8]):
                raise ImportConflict(f"archive {src}: run {stream} n={n} differs from the event this home holds "
                                     "there (the run went on differently here); nothing imported")
        new.extend(rows[len(here):])
    for i in range(0, len(new), 500):
        chunk = [r[0] for r in new[i:i + 500]]
        taken = log.conn.execute(f"SELECT id, stream, n FROM events WHERE id IN ({','.join('?' * len(chunk))})",
                                 chunk).fetchone()
        if taken:
            raise ImportConflict(f"archive {src}: event id {taken[0]} is already stored in this home as "
                                 f"{taken[1]} n={taken[2]}; nothing imported")
    return new


def imported_streams(log: EventLog) -> set[str]:
    """Streams whose head is still the one an import recorded: work done elsewhere, which a daemon here must
    not drive on (a stream continued here since, e.g. after `rloopd resume`, is this home's own again)."""
    last: dict[str, str] = {}
    for e in log.read("home", types=["run.imported"]):
        last.update(e.data["streams"])
    return {s for s, head in last.items() if (log.head(s) or (None, None))[1] == head}


def project_imported(home: Home, streams: Iterable[str]) -> list[str]:
    """Project the run directory and experiments rows of each imported run whose directory is behind its log
    (as `Loop.project` does for a live run, plus the workspace at the best commit and the frozen files, as
    a fork's setup does), so that replay finds the live projections it compares with. Returns those runs."""
    table = ex.ExperimentsTable(home.log)
    table.catch_up()
    foreign = imported_streams(home.log)
    done = []
    for run in streams:
        head = home.log.head(run)
        if run not in foreign or head is None or table.position_of(f"rundir:{run}") == head[0]:
            continue
        events = history(home.log, run)
        state = fold(events)
        run_dir = home.run_dir(run)
        home.secure_run(run, {"sandbox": "none"})  # a record of work done elsewhere: no uid of this home runs it
        home.snapshots.restore(state.best_commit or state.base_commit, run_dir / "workspace")
        materialize_frozen(run_dir, state.created.get("manifest", []), home.blobs)
        mem = MemoryFiles()
        for e in events:
            mem.apply(e)
        rows = [r for _, r in sorted(ex.rebuild(events).items(), key=lambda kv: (kv[0][1], kv[0][2]))]
        project_memory(run_dir, mem, home.blobs, ex.results_tsv(rows, state.created.get("metric", "val_bpb")))
        table.set_position(f"rundir:{run}", head[0])
        done.append(run)
    return done


def import_archive(home: Home, src: Path, expect: dict[str, str] | None = None) -> dict[str, Any]:
    """Verify the archive at `src` whole, then add what this home lacks and project it; return a summary.

    Writes come in the order appends use: blobs, then commits, then the events (one transaction, with the
    `run.imported` record), so an event never names what is not there; then the projections.
    """
    src = Path(src)
    with tempfile.TemporaryDirectory(prefix="rloopd-import-") as tmp:
        stage = Path(tmp) / "archive"
        stage.mkdir()
        digests = _unpack(src, stage)
        doc = _read_doc(src, stage, digests)
        checked = _verify(src, stage, digests, doc, expect or {})
        scratch = Snapshots(Path(tmp) / "git")
        _check_bundle(src, stage, checked, scratch)
        new = _plan(src, home.log, checked)
        # Everything is verified: from here on the home changes.
        blobs_added = 0
        for digest in sorted(checked.blobs):
            if (stage / "blobs" / digest).exists() and not home.blobs.exists(digest):
                home.blobs.put((stage / "blobs" / digest).read_bytes())
                blobs_added += 1
        lacking = home.snapshots.missing(sorted(checked.commits))
        if lacking:
            scratch.pin({f"refs/rloopd/{checked.commits[c][0]}/{c}": c for c in lacking})
            home.snapshots.fetch(scratch.git_dir, "refs/rloopd/*")
        added = {}
        for row in new:
            added[row[1]] = added.get(row[1], 0) + 1
        gone = sorted(d for d in doc.collected if d in checked.blobs and not home.blobs.exists(d))
        then = [("home", NewEvent("run.imported", {
            "run": doc.run, "archive": str(src), "sha256": _file_sha256(src),
            "streams": {s: checked.heads[s] for s in added}, "events": len(new)}))]
        if gone:  # so that audit here, too, tells a checkpoint gc collected there from a lost one
            then.append(("home", NewEvent("blobs.collected", {
                "removed": gone, "rule": f"collected before export, on the home archive {src} was made on"})))
        try:
            if new:
                home.log.insert_stored(new, then)
        except StaleRun as e:  # another writer got there between the plan and the transaction
            raise ImportConflict(f"archive {src}: {e}; no events imported") from None
    projected = project_imported(home, checked.rows)
    return {"run": doc.run, "name": doc.name, "file": str(src), "already_present": not (new or blobs_added or lacking),
            "added": {"events": len(new), "streams": added, "blobs": blobs_added, "commits": len(lacking)},
            "streams": [s.model_dump() for s in doc.streams], "projected": projected}
