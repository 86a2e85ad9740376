"""The run directory the agent sees, projected from the log: program.md, frozen/, memory/.

`runs/<run>/` is laid out like a lab (DESIGN section 5): `program.md` (the version in force, read-only),
`workspace/` (restored from snapshots by the loop, not here), `frozen/` (the lab's public frozen files;
private ones never), and `memory/` with `results.tsv`, `notes.md`, `artifacts/` and the best checkpoint.
Everything here is rebuilt from events and blobs; what is not in the log does not survive.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rloopd.blobs import BlobStore
from rloopd.fstree import prune_empty
from rloopd.log import Event
from rloopd.snapshots import put_file, read_tree

CHECKPOINT = "checkpoint.pt"
POLICIES = ("notes", "none", "results-only", "from:RUN[@STEP]")


def policy_kind(policy: str | None) -> str:
    """`notes`, `none`, `results-only` or `from` (for `from:RUN[@STEP]`); what a session is shown:

    | kind         | results.tsv | notes.md, artifacts/              | checkpoint.pt (and warm start) |
    |--------------|-------------|-----------------------------------|--------------------------------|
    | notes        | yes         | carried across sessions           | the run's best                 |
    | from         | yes         | the source's, then carried        | the source's, then the run's   |
    | results-only | yes         | empty at each session start       | no                             |
    | none         | no          | empty at each session start       | no                             |

    Under `none` and `results-only` the agent may still write notes and artifacts during a session; they
    are captured as `memory.written` like any other (the log keeps them), and simply not shown again."""
    policy = policy or "notes"
    return "from" if policy.startswith("from:") else policy


def carries(policy: str | None) -> bool:
    """Whether notes, artifacts and the checkpoint carry from one session to the next."""
    return policy_kind(policy) in ("notes", "from")


@dataclass
class MemoryFiles:
    """The fold of `memory.written`, `checkpoint.saved` (accepted), `program.changed` and, for the memory
    policies that carry nothing, `session.started` (see `policy_kind`)."""

    TYPES = frozenset({"run.created", "program.changed", "memory.written", "checkpoint.saved", "experiment.decided",
                       "session.started"})

    program_blob: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # path inside memory/ -> blob: all the log holds
    checkpoint_blob: str | None = None
    pending_checkpoint: dict[int, str] = field(default_factory=dict)
    policy: str = "notes"
    visible: dict[str, str] = field(default_factory=dict)  # what the run directory shows (files, when carried)
    inherited: bool = False  # the checkpoint came from another run (`from:`); the baseline does not replace it

    def apply(self, e: Event) -> None:
        d: dict[str, Any] = e.data
        if e.type == "run.created":
            self.program_blob = d.get("program_blob")
            self.policy = d.get("memory_policy") or "notes"
            source = d.get("memory_from")
            if source and not d.get("parent"):  # a fork keeps what its parent's history folded to
                self.files = {f["path"]: f["blob"] for f in source.get("files", [])}
                self.visible = dict(self.files)
                self.checkpoint_blob = source.get("checkpoint_blob")
                self.inherited = self.checkpoint_blob is not None
        elif e.type == "program.changed":
            self.program_blob = d["program_blob"]
        elif e.type == "session.started":
            if not carries(self.policy):
                self.visible = {}
        elif e.type == "memory.written":
            for files in (self.files, self.visible):
                if d.get("blob"):
                    files[d["path"]] = d["blob"]
                else:
                    files.pop(d["path"], None)
        elif e.type == "checkpoint.saved":
            self.pending_checkpoint[d["step"]] = d["blob"]
        elif e.type == "experiment.decided":
            blob = self.pending_checkpoint.pop(d["step"], None)
            if d["accepted"] and blob and not (self.inherited and d["step"] == 0):
                self.checkpoint_blob = blob

    @property
    def shown_checkpoint(self) -> str | None:
        """The checkpoint the run directory shows and a lab may warm-start from, under the policy."""
        return self.checkpoint_blob if carries(self.policy) else None


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` whole, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def frozen_dest(run_dir: Path, path: str) -> Path:
    """Where a public frozen lab file sits in a run directory (under frozen/, as in the lab)."""
    rel = Path(path)
    return run_dir / rel if rel.parts[0] == "frozen" else run_dir / "frozen" / rel


def materialize_frozen(run_dir: Path, manifest: list[dict[str, Any]], blobs: BlobStore) -> None:
    """Copy the lab's public frozen files into runs/<run>/frozen/, read-only; private ones never."""
    for entry in manifest:
        if entry["role"] != "frozen" or not entry.get("blob"):
            continue
        dest = frozen_dest(run_dir, entry["path"])
        write_atomic(dest, blobs.get(entry["blob"]), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def project_memory(run_dir: Path, mem: MemoryFiles, blobs: BlobStore, results_tsv: str,
                   written: dict[str, str] | None = None) -> None:
    """Write program.md and memory/ from the fold; results.tsv from the experiments projection.

    `written` (path -> blob) remembers what an earlier call wrote, so an unchanged file (a checkpoint of
    megabytes) is not rewritten after every experiment; pass the same dict each time, or None.
    """
    written = {} if written is None else written
    kind = policy_kind(mem.policy)

    def put(path: Path, blob: str, mode: int = 0o644) -> None:
        key = str(path)
        if written.get(key) != blob or not path.exists():
            write_atomic(path, blobs.get(blob), mode)
            written[key] = blob

    if mem.program_blob:
        put(run_dir / "program.md", mem.program_blob, 0o444)
    memory = run_dir / "memory"
    (memory / "artifacts").mkdir(parents=True, exist_ok=True)
    if kind != "none":
        write_atomic(memory / "results.tsv", results_tsv.encode(), 0o444)
    notes = memory / "notes.md"
    if "notes.md" in mem.visible:
        put(notes, mem.visible["notes.md"])
    elif not notes.exists() or (not carries(mem.policy) and (notes.is_symlink() or notes.stat().st_size)):
        write_atomic(notes, b"")  # nothing written yet, or a new session under a policy that carries nothing
        written.pop(str(notes), None)
    for path, blob in mem.visible.items():  # artifacts/: the agent's own directory, written by descriptor
        if path != "notes.md" and (written.get(str(memory / path)) != blob or not (memory / path).is_file()):
            put_file(memory, path, blobs.get(blob))
            written[str(memory / path)] = blob
    # A checkpoint `rloopd gc` collected (a fork's at an old step) is simply absent; audit tells that from a loss.
    shown = mem.shown_checkpoint
    checkpoint = shown if shown and blobs.exists(shown) else None
    if checkpoint:
        put(memory / CHECKPOINT, checkpoint, 0o444)
    # What is not in the log does not survive: files the fold does not name are removed. Under artifacts/
    # a live agent may swap a directory for a link, so that tree is walked and pruned by descriptor.
    keep = ({"results.tsv"} if kind != "none" else set()) | {"notes.md", *mem.visible} | \
        ({CHECKPOINT} if checkpoint else set())
    artifacts = memory / "artifacts"
    if artifacts.is_dir() and not artifacts.is_symlink():
        for rel in read_tree(artifacts, contents=False):
            if f"artifacts/{rel}" not in keep:
                put_file(memory, f"artifacts/{rel}", None)
                written.pop(str(artifacts / rel), None)
        prune_empty(artifacts)
    for path in memory.iterdir():
        if path.name != "artifacts" and path.name not in keep and (path.is_file() or path.is_symlink()):
            path.unlink()
            written.pop(str(path), None)
