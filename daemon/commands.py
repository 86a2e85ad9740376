"""What the daemon does for each control request: one function per op, each returning a small dict.

Every effect is an event. A command's request id becomes the id of the event it causes, so a client that
retries after a lost reply finds the event already stored and the command is not applied twice.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rloopd import __version__, runs
from rloopd.errors import DaemonError
from rloopd.history import run_state
from rloopd.home import Home
from rloopd.log import NewEvent
from rloopd.memory.rundir import write_atomic
from rloopd.memory.state import RunState

if TYPE_CHECKING:
    from rloopd.service import Daemon


def _state(home: Home, run: str) -> RunState:
    return run_state(home.log, run)


def _done_before(home: Home, request: str) -> bool:
    return home.log.stream_of(request) is not None


def _wait_status(home: Home, run: str, leaving: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _state(home, run).status
        if status != leaving:
            return status
        time.sleep(0.05)
    raise DaemonError(f"run {run} did not leave {leaving} within {timeout:.0f} s")


def ping(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    import os

    return {"pid": os.getpid(), "version": __version__}


def run(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    prior = home.log.stream_of(request)
    if prior:
        return {"run_id": prior}
    run_id = runs.create_run(home, Path(args["lab"]), agent=args.get("agent"),
                             experiments=args.get("experiments"), budget=args.get("budget"),
                             seed=int(args.get("seed", 0)), name=args.get("name"),
                             sandbox=args.get("sandbox", "auto"), window=args.get("window"), request=request,
                             memory=args.get("memory"), space=args.get("space"))
    daemon.start_worker(run_id)
    return {"run_id": run_id}


def fork(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    from rloopd.fork import fork_run

    prior = home.log.stream_of(request)
    if prior:
        return {"run_id": prior}
    run_id = fork_run(home, args["run"], int(args["step"]), name=args.get("name"), agent=args.get("agent"),
                      program=Path(args["program"]) if args.get("program") else None,
                      experiments=args.get("experiments"), window=args.get("window"), seed=args.get("seed"),
                      request=request)
    daemon.start_worker(run_id)
    return {"run_id": run_id}


def batch(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    from rloopd.batch import create_batch

    made_batch, made = create_batch(home, Path(args["file"]), request=request)
    for run_id in made:  # every condition's first run, then every second one: the conditions keep abreast
        daemon.start_worker(run_id)
    return {"batch": made_batch, "runs": made}


def _live(daemon: Daemon, run: str):
    with daemon.guard:
        return daemon.workers.get(run)


def pause(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    run_id = home.log.resolve(args["run"])
    if _done_before(home, request):
        return {"run_id": run_id, "status": _state(home, run_id).status}
    state = _state(home, run_id)
    if state.status != "running":
        raise DaemonError(f"run {run_id} is {state.status}, not running: nothing to pause")
    worker = _live(daemon, run_id)
    if worker is None:
        home.log.append(run_id, [NewEvent("run.paused", {"by": "cli"}, id=request)])
        return {"run_id": run_id, "status": "paused"}
    worker.stop.set("paused", by="cli", request=request)
    return {"run_id": run_id, "status": _wait_status(home, run_id, "running")}


def stop(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    run_id = home.log.resolve(args["run"])
    if _done_before(home, request):
        return {"run_id": run_id, "status": _state(home, run_id).status}
    state = _state(home, run_id)
    worker = _live(daemon, run_id)
    if state.status == "running" and worker is not None:
        worker.stop.set("stopped", by="cli", request=request)
        return {"run_id": run_id, "status": _wait_status(home, run_id, "running")}
    if state.status in ("running", "paused"):
        home.log.append(run_id, [NewEvent("run.stopped", {"by": "cli"}, id=request)])
        return {"run_id": run_id, "status": "stopped"}
    raise DaemonError(f"run {run_id} is {state.status}: nothing to stop")


def resume(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    run_id = home.log.resolve(args["run"])
    if not _done_before(home, request):
        state = _state(home, run_id)
        if state.status not in ("paused", "stopped"):
            raise DaemonError(f"run {run_id} is {state.status}: only a paused or stopped run can resume")
        home.log.append(run_id, [NewEvent("run.resumed", {"by": "cli"}, id=request)])
    if _state(home, run_id).status == "running":
        daemon.start_worker(run_id)
    return {"run_id": run_id, "status": _state(home, run_id).status}


def program(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    run_id = home.log.resolve(args["run"])
    path = Path(args["file"]).absolute()
    if not _done_before(home, request):
        state = _state(home, run_id)
        if state.status in ("finished", "failed", "archived"):
            raise DaemonError(f"run {run_id} is {state.status}: its program no longer matters")
        try:
            text = path.read_bytes()
        except OSError as e:
            raise DaemonError(f"{path}: cannot read the program file ({e.strerror})") from None
        blob = home.blobs.put(text)
        home.log.append(run_id, [NewEvent("program.changed", {"program_blob": blob, "source": "cli",
                                                              "path": str(path)}, id=request)])
        write_atomic(home.run_dir(run_id) / "program.md", text, 0o444)
    if _live(daemon, run_id) is None:  # no loop will project it: the run directory and its position follow now
        runs.project_run(home, run_id)
    return {"run_id": run_id, "program": str(path)}


def status(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    live = {}
    with daemon.guard:
        workers = list(daemon.workers.values())
    for w in workers:
        left = w.loop.window_left() if w.loop is not None else None
        live[w.run] = {"slot": daemon.pool.slot_of(w.run), "step": w.step,
                       "elapsed": round(time.monotonic() - w.started, 1),
                       "window_left": None if left is None else round(left, 1)}
    with daemon.guard:
        stalled = {run: dict(st) for run, st in daemon.stalled.items()}
    for run, st in stalled.items():  # waiting for space: no thread, or one that is trying again
        live.setdefault(run, {"slot": [], "step": None, "elapsed": None, "window_left": None})
        live[run]["stalled"] = {"why": st["why"], "since": st["since"]}
    return {"pid": __import__("os").getpid(), "heartbeat": daemon.heartbeat, "slots": daemon.pool.names,
            "busy": dict(daemon.pool.holders), "runs": live,
            "dashboard": daemon.dashboard.url if daemon.dashboard is not None else None}


def dashboard(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    """The dashboard's link with its token (`rloopd dashboard`): whoever may use this socket may pause, stop
    and fork anyway, and the token file (0600) may not be theirs to read (a service's researchers)."""
    if daemon.dashboard is None:
        raise DaemonError("this daemon serves no dashboard: start it with `rloopd serve --http 127.0.0.1:8765` "
                          "(or http = \"127.0.0.1:8765\" in rloopd.toml)")
    return daemon.dashboard.link()


def archive(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    from rloopd.housekeeping import archive_run

    run_id = home.log.resolve(args["run"])
    return {"run_id": run_id, "status": archive_run(home, run_id, args.get("reason", ""), request=request)}


def gc(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    from rloopd.housekeeping import collect

    return collect(home, int(args["keep_last"]), float(args["orphan_age"]), bool(args.get("dry_run")),
                   request=request).as_dict()


def import_(daemon: Daemon, home: Home, args: dict, request: str) -> dict[str, Any]:
    """Import an archive while this daemon holds the home; importing is idempotent, so a retry adds nothing.
    The imported run is not started: it is a record of work done elsewhere."""
    from rloopd.transfer import import_archive

    return import_archive(home, Path(args["file"]), args.get("expect") or {})


# The arguments of each op, as `rloopd`'s own commands send them: a JSON type, then `!` for a required one
# (never null), `?` for an optional one that may be null, nothing for an optional one that may not. Checked
# before the handler runs (`check_request`), so a malformed request is refused naming its argument.
ARGS: dict[str, dict[str, str]] = {
    "ping": {}, "status": {}, "dashboard": {},
    "run": {"lab": "string!", "agent": "string?", "experiments": "integer?", "budget": "string?", "seed": "integer",
            "name": "string?", "sandbox": "string", "window": "string?", "memory": "string?", "space": "string?"},
    "fork": {"run": "string!", "step": "integer!", "name": "string?", "agent": "string?", "program": "string?",
             "experiments": "integer?", "window": "string?", "seed": "integer?"},
    "batch": {"file": "string!"},
    "pause": {"run": "string!"}, "resume": {"run": "string!"}, "stop": {"run": "string!"},
    "program": {"run": "string!", "file": "string!"},
    "archive": {"run": "string!", "reason": "string"},
    "gc": {"keep_last": "integer!", "orphan_age": "number!", "dry_run": "boolean"},
    "import": {"file": "string!", "expect": "object?"},
}


def _json_type(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL byte"
    try:
        text.encode()
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    return None


def check_request(op: Any, args: Any, request: Any) -> str | None:
    """Why a control request cannot be served as sent (one line naming the op, argument or field), or None."""
    if not isinstance(op, str) or op not in HANDLERS:
        return f"unknown op {op!r}: the daemon takes {', '.join(sorted(HANDLERS))}"
    if not isinstance(args, dict):
        return f"malformed {op} request: args must be a JSON object, not {_json_type(args)}"
    if not isinstance(request, str) or not request or _text_problem(request):
        return f"malformed {op} request: request must be a non-empty UTF-8 string (the request id)"
    spec = ARGS.get(op, {})  # an op not listed takes no arguments
    for name, value in args.items():
        if name not in spec:
            return f"malformed {op} request: unknown argument {name!r} (it takes {', '.join(spec) or 'none'})"
        kind = spec[name].rstrip("!?")
        if value is None:
            if not spec[name].endswith("?"):
                return f"malformed {op} request: argument {name!r} must be {_a(kind)}, not null"
            continue
        if _json_type(value) != kind and not (kind == "number" and _json_type(value) == "integer"):
            return f"malformed {op} request: argument {name!r} must be {_a(kind)}, not {_a(_json_type(value))}"
        if kind == "number" and not math.isfinite(value):
            return f"malformed {op} request: argument {name!r} must be a finite number"
        texts = [value] if kind == "string" else [t for kv in value.items() for t in kv] if kind == "object" else []
        for text in texts:
            if not isinstance(text, str):
                return f"malformed {op} request: argument {name!r} must map strings to strings"
            if problem := _text_problem(text):
                return f"malformed {op} request: argument {name!r} {problem}"
    missing = [name for name, kind in spec.items() if kind.endswith("!") and name not in args]
    if missing:
        return f"malformed {op} request: argument {missing[0]!r} is missing"
    return None


HANDLERS = {"ping": ping, "dashboard": dashboard, "run": run, "fork": fork, "batch": batch, "pause": pause, "resume": resume, "stop": stop, "program": program,
            "archive": archive, "gc": gc, "import": import_, "status": status}
