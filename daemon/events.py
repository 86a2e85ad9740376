"""Payload models of every event type, with their schema versions and the upcasters between versions.

Events are past-tense facts. A shipped type never changes meaning: a new field gets a default; a new
meaning gets a new type, or a new `v` with an upcaster registered in `UPCASTERS` that turns a payload of
version v into one of version v+1. `validate(type, data)` checks a payload before it is written;
`decode(type, v, data)` reads one back at any known version and returns today's model.

Blob references follow one naming rule so that audit and gc can find them without knowing every type:
a key named `blob` or ending in `_blob` holds one sha256 hex digest, a key ending in `_blobs` a list of them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NotRequired

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from rloopd.errors import PayloadInvalid, UnknownEventType


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# --- runs ------------------------------------------------------------------------------------------


class ManifestEntry(Payload):
    path: str
    sha256: str
    blob: str | None = None  # None for files too large to keep (recorded, then checked by hash only)
    role: Literal["editable", "frozen", "private", "program", "other"]


class AgentFile(Payload):
    """A command agent's own script, when it is a file of the lab: recorded, and run from its blob."""

    path: str  # relative to the lab
    sha256: str
    blob: str


class ForkPoint(Payload):
    run: str
    n: int  # position of the parent's event the fork continues from (its chain's prev)
    step: int


class MemoryFile(Payload):
    path: str  # inside memory/ (notes.md, artifacts/...)
    blob: str


class MemorySource(Payload):
    """`from:RUN[@STEP]`: the memory a run starts with, as the source run's history folded to `n`."""

    run: str  # the source run (its id)
    step: int | None = None  # None: its latest
    stream: str  # where the source's history was cut (the source itself, or an ancestor for an early step)
    n: int
    files: list[MemoryFile] = []
    checkpoint_blob: str | None = None
    lineage: list[dict[str, Any]] = []  # [{run, step}] back to the first run: knowledge passed run to run


class RunCreated(Payload):
    name: str
    lab: str  # path of the lab directory at creation
    manifest: list[ManifestEntry] = []
    config: dict[str, Any] = {}  # resolved rloop.toml
    metric: str = "val_bpb"
    direction: Literal["minimize", "maximize"] = "minimize"
    agent: str = "random"
    agent_files: list[AgentFile] = []
    memory_policy: str = "notes"  # notes | none | results-only | from:RUN[@STEP] (memory/rundir.py)
    memory_from: MemorySource | None = None
    search_space: dict[str, Any] = {}  # preset (None: the lab's top level), editable globs, regions
    budget: str = ""
    experiments: int | None = None  # cap on experiments, None for no cap
    window_seconds: float | None = None
    seed: int = 0
    base_commit: str = ""
    program_blob: str | None = None
    program_path: str | None = None  # the program file the run follows, when not the lab's program.md
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
    agent_version: str | None = None  # what a CLI agent's `--version` printed (codex, claude)


SessionEndReason = Literal[
    "agent-exit", "window", "paused", "stopped", "daemon-restart", "timeout",
    "spend-cap", "empty-cap", "provider-error", "error", "disk-cap",
]


class SessionEnded(Payload):
    """v2: token counts as one `usage` mapping (v1 had only `tokens_in`/`tokens_out`), because the CLIs
    report more kinds than two (cached input, cache writes, reasoning), each priced differently."""

    session: int
    exit_code: int | None = None
    reason: SessionEndReason
    usage: dict[str, int] = {}  # input, output, cached_input, cache_write, reasoning: as the agent reports them
    cost_usd: float | None = None
    output_blob: str | None = None  # stdout (a CLI's raw JSON stream), capped; stderr too for `cmd:` agents
    stderr_blob: str | None = None  # a CLI's stderr, kept apart from its stream


def _session_ended_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    usage = {new: data[old] for old, new in (("tokens_in", "input"), ("tokens_out", "output"))
             if data.get(old) is not None}
    return {**{k: v for k, v in data.items() if k not in ("tokens_in", "tokens_out")}, "usage": usage}


class AgentActed(Payload):
    session: int
    kind: Literal["message", "command", "edit", "tool", "reasoning", "error"]  # error: provider errors and
    summary: str                                                                  # unreadable stream lines
    detail_blob: str | None = None


# --- experiments -----------------------------------------------------------------------------------


class ExperimentSubmitted(Payload):
    session: int
    message: str
    ticket: str
    step: int | None = None  # the experiment it started (the next experiment.started of this run)


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
    suggested_by: str | None = None  # a model-based policy's suggestion (`optuna:tpe`): params are what it said
    study: dict[str, Any] | None = None  # ... and the study it was asked of: sampler seed, trials told
    warm_start_blob: str | None = None  # the checkpoint offered to train(ctx) (a lab with warm_start = true)


ExperimentStatus = Literal["ok", "crashed", "oom", "timeout", "invalid", "interrupted"]


class ExperimentFinished(Payload):
    step: int
    replica: int = 0
    attempt: int = 0
    status: ExperimentStatus
    metrics: dict[str, float | int | None] = {}
    log_blob: str | None = None
    wall_seconds: float = 0.0
    warm_started: bool | None = None  # train(ctx) loaded the offered checkpoint (None: none was offered)
    reason: str | None = None  # why the judge gave this status ("causality probe failed"), when it says


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
    mean: float | None = None  # rerun:K: the mean of the metric over replicas 0..K
    replicas: list[float | None] = []  # rerun:K: the metric of each replica, 0..K (None: did not complete)


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


class RunImported(Payload):
    """In the `home` stream: streams added from an archive made on another home (`rloopd import`).

    The runs it names are records of work done elsewhere: a daemon does not drive them while their head
    is still the imported one (fork one to continue it here)."""

    run: str
    archive: str  # the archive file as given
    sha256: str  # of the archive file
    streams: dict[str, str] = {}  # stream -> its head hash after the import, for each stream it added to
    events: int = 0


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
    "session.ended": (2, SessionEnded),
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
    "run.imported": (1, RunImported),
}

# (type, v) -> function turning a version-v payload dict into a version v+1 one.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("session.ended", 1): _session_ended_v1_to_v2,
}


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


@functools.cache
def _list_validator(type_: str) -> TypeAdapter:
    """A validator of lists of `type_` payloads. A model of plain fields (no validator, constraint or alias:
    every model here) is checked as a TypedDict of the same fields and config, which accepts and refuses what
    the model does (a test holds them to that) at a third of the cost, building no model per payload; any
    other model is checked as itself."""
    model = _model(type_)
    hooks = model.__pydantic_decorators__
    plain = not any(getattr(hooks, f.name) for f in dataclasses.fields(hooks)) and all(
        not f.metadata and f.alias is None and f.discriminator is None and not f.validate_default
        for f in model.model_fields.values())
    if not plain:
        return TypeAdapter(list[model])
    shape = TypedDict(model.__name__, {
        name: f.annotation if f.is_required() else NotRequired[f.annotation] for name, f in model.model_fields.items()})
    shape.__pydantic_config__ = model.model_config
    return TypeAdapter(list[shape])


def all_valid(type_: str, payloads: list[dict[str, Any]]) -> bool:
    """Whether every payload is a valid current-version `type_` payload: one pydantic call for all of them
    (audit checks a million this way); `decode` each one to learn what is wrong with one."""
    try:
        _list_validator(type_).validate_python(payloads)
    except ValidationError:
        return False
    return True


def decode(type_: str, v: int, data: dict[str, Any]) -> Payload:
    """Read a stored payload back as today's model, upcasting older versions."""
    data = upcast(type_, v, data)
    try:
        return _model(type_).model_validate(data)
    except ValidationError as e:
        raise PayloadInvalid(_one_line(type_, e)) from None


def blob_refs(data: Any) -> list[str]:
    """Every blob digest a payload names, by the naming rule in this module's docstring.

    Audit and replay call this for every event, so it builds one list and descends only into containers."""
    found: list[str] = []
    _collect_refs(data, found)
    return found


def _collect_refs(data: Any, found: list[str]) -> None:
    if type(data) is dict:
        for key, value in data.items():
            if type(value) is str:
                if key == "blob" or key.endswith("_blob"):
                    found.append(value)
            elif type(value) is list and key.endswith("_blobs"):
                found.extend(x for x in value if type(x) is str)
            elif type(value) is dict or type(value) is list:
                _collect_refs(value, found)
    elif type(data) is list:
        for item in data:
            if type(item) is dict or type(item) is list:
                _collect_refs(item, found)
