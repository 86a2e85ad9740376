"""Payload models of every event type, with their schema versions and the upcasters between versions.

Events are past-tense facts. A shipped type never changes meaning: a new field gets a default; a new
meaning gets a new type, or a new `v` with an upcaster registered in `UPCASTERS` that turns a payload of
version v into one of version v+1. `validate(type, data)` checks a payload before it is written;
`decode(type, v, data)` reads one back at any known version and returns today's model.

Blob references follow one naming rule so that audit and gc can find them without knowing every type:
a key named `blob` or ending in `_blob` holds one sha256 hex digest, a key ending in `_blobs` a list of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from rloopd.errors import PayloadInvalid, UnknownEventType


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- runs ------------------------------------------------------------------------------------------


class ManifestEntry(Payload):
    path: str
    sha256: str
    blob: str | None = None  # None for files too large to keep (recorded, then checked by hash only)
    role: Literal["editable", "frozen", "private", "program", "other"]


class ForkPoint(Payload):
    run: str
    n: int  # position of the parent's event the fork continues from (its chain's prev)
    step: int


class RunCreated(Payload):
    name: str
    lab: str  # path of the lab directory at creation
    manifest: list[ManifestEntry] = []
    config: dict[str, Any] = {}  # resolved rloop.toml
    metric: str = "val_bpb"
    direction: Literal["minimize", "maximize"] = "minimize"
    agent: str = "random"
    memory_policy: str = "notes"
    search_space: dict[str, Any] = {}
    budget: str = ""
    experiments: int | None = None  # cap on experiments, None for no cap
    window_seconds: float | None = None
    seed: int = 0
    base_commit: str = ""
    program_blob: str | None = None
    sandbox: str = "none"
    uid: int | None = None  # the run's own unprivileged uid for its sandboxed processes (as root)
    parent: ForkPoint | None = None
    batch: str | None = None
    condition: str | None = None


class RunNote(Payload):
    """run.paused, run.resumed, run.stopped, run.archived: who or why."""

    by: str = "cli"
    reason: str = ""


class RunFinished(Payload):
    reason: str = ""
    best: float | None = None
    best_step: int | None = None
    best_commit: str | None = None


class RunWarned(Payload):
    about: str
    message: str


class ProgramChanged(Payload):
    program_blob: str
    source: Literal["live-edit", "cli", "fork"] = "cli"
    path: str = ""


# --- sessions and agents ---------------------------------------------------------------------------


class SessionStarted(Payload):
    session: int
    agent: str
    program_blob: str | None = None


SessionEndReason = Literal[
    "agent-exit", "window", "paused", "stopped", "daemon-restart", "timeout",
    "spend-cap", "empty-cap", "provider-error", "error",
]


class SessionEnded(Payload):
    session: int
    exit_code: int | None = None
    reason: SessionEndReason
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost_usd: float | None = None
    output_blob: str | None = None


class AgentActed(Payload):
    session: int
    kind: Literal["message", "command", "edit", "tool", "reasoning"]
    summary: str
    detail_blob: str | None = None


# --- experiments -----------------------------------------------------------------------------------


class ExperimentSubmitted(Payload):
    session: int
    message: str
    ticket: str


class ExperimentStarted(Payload):
    step: int
    replica: int = 0
    attempt: int = 0
    commit: str
    description: str = ""
    category: str | None = None
    params: dict[str, Any] = {}
    program_blob: str | None = None
    diff_blob: str | None = None


ExperimentStatus = Literal["ok", "crashed", "oom", "timeout", "invalid", "interrupted"]


class ExperimentFinished(Payload):
    step: int
    replica: int = 0
    attempt: int = 0
    status: ExperimentStatus
    metrics: dict[str, float | int | None] = {}
    log_blob: str | None = None
    wall_seconds: float = 0.0


class CheckpointSaved(Payload):
    step: int
    blob: str


class ExperimentDecided(Payload):
    step: int
    accepted: bool
    reason: str = ""
    best_before: float | None = None
    best_after: float | None = None
    best_commit: str | None = None


class MemoryWritten(Payload):
    path: str
    blob: str | None = None  # None: the file was deleted
    session: int | None = None


class IntegrityViolated(Payload):
    step: int | None = None
    paths: list[str]
    found: str
    reverted: bool = True


# --- batches and the home --------------------------------------------------------------------------


class BatchCreated(Payload):
    question: str
    conditions: list[dict[str, Any]] = []
    repeats: int = 1
    criteria: dict[str, Any] = {}


class BatchRunAdded(Payload):
    run: str
    condition: str


class DaemonStarted(Payload):
    version: str
    pid: int | None = None
    recovery: dict[str, Any] = {}


class DaemonStopped(Payload):
    reason: str = ""


class BlobsCollected(Payload):
    removed: list[str] = []  # digests removed (not named `_blobs`: they are gone on purpose)
    rule: str = ""
    bytes_freed: int = 0


# type -> (current version, model)
TYPES: dict[str, tuple[int, type[Payload]]] = {
    "run.created": (1, RunCreated),
    "run.paused": (1, RunNote),
    "run.resumed": (1, RunNote),
    "run.stopped": (1, RunNote),
    "run.finished": (1, RunFinished),
    "run.warned": (1, RunWarned),
    "run.archived": (1, RunNote),
    "program.changed": (1, ProgramChanged),
    "session.started": (1, SessionStarted),
    "session.ended": (1, SessionEnded),
    "agent.acted": (1, AgentActed),
    "experiment.submitted": (1, ExperimentSubmitted),
    "experiment.started": (1, ExperimentStarted),
    "experiment.finished": (1, ExperimentFinished),
    "checkpoint.saved": (1, CheckpointSaved),
    "experiment.decided": (1, ExperimentDecided),
    "memory.written": (1, MemoryWritten),
    "integrity.violated": (1, IntegrityViolated),
    "batch.created": (1, BatchCreated),
    "batch.run-added": (1, BatchRunAdded),
    "daemon.started": (1, DaemonStarted),
    "daemon.stopped": (1, DaemonStopped),
    "blobs.collected": (1, BlobsCollected),
}

# (type, v) -> function turning a version-v payload dict into a version v+1 one.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def current_version(type_: str) -> int:
    try:
        return TYPES[type_][0]
    except KeyError:
        raise UnknownEventType(f"unknown event type {type_!r}") from None


def _model(type_: str) -> type[Payload]:
    current_version(type_)
    return TYPES[type_][1]


def _one_line(type_: str, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(payload)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"invalid {type_} payload: {where}: {first['msg']}{more}"


def validate(type_: str, data: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """Check a payload for `type_` at its current version and return it as a plain JSON-ready dict."""
    entry = TYPES.get(type_)
    if entry is None:
        raise UnknownEventType(f"unknown event type {type_!r}")
    model = entry[1]
    if isinstance(data, BaseModel):
        if not isinstance(data, model):
            raise PayloadInvalid(f"a {type(data).__name__} is not a {type_} payload")
        data = data.model_dump(mode="json")
    try:  # pydantic-core directly: this is on the append path
        return model.__pydantic_serializer__.to_python(model.__pydantic_validator__.validate_python(data), mode="json")
    except ValidationError as e:
        raise PayloadInvalid(_one_line(type_, e)) from None


def upcast(type_: str, v: int, data: dict[str, Any]) -> dict[str, Any]:
    """Bring a stored payload of version `v` up to the current version of its type."""
    target = current_version(type_)
    if v > target:
        raise UnknownEventType(f"{type_} v{v} is newer than this rloopd knows (v{target}); upgrade rloopd")
    while v < target:
        step = UPCASTERS.get((type_, v))
        if step is None:
            raise UnknownEventType(f"no upcaster for {type_} v{v} -> v{v + 1}")
        data = step(dict(data))
        v += 1
    return data


def decode(type_: str, v: int, data: dict[str, Any]) -> Payload:
    """Read a stored payload back as today's model, upcasting older versions."""
    data = upcast(type_, v, data)
    try:
        return _model(type_).model_validate(data)
    except ValidationError as e:
        raise PayloadInvalid(_one_line(type_, e)) from None


def blob_refs(data: Any) -> Iterator[str]:
    """Every blob digest a payload names, by the naming rule in this module's docstring."""
    if isinstance(data, dict):
        for key, value in data.items():
            if (key == "blob" or key.endswith("_blob")) and isinstance(value, str):
                yield value
            elif key.endswith("_blobs") and isinstance(value, list):
                yield from (x for x in value if isinstance(x, str))
            else:
                yield from blob_refs(value)
    elif isinstance(data, list):
        for item in data:
            yield from blob_refs(item)
