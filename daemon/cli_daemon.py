"""CLI commands that talk to the daemon: serve, pause, resume, stop, program, backup."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import structlog
import typer

from rloopd import control
from rloopd.cli import HomeOpt, JsonOpt, app, command, emit_json, out
from rloopd.errors import DaemonError
from rloopd.home import Home, default_home
from rloopd.lock import HomeLock, daemon_running

RunArg = Annotated[str, typer.Argument(help="Run id, unique prefix or name.")]


def configure_logging() -> None:
    """structlog: JSON lines on stdout (journald keeps them), readable lines when stdout is a terminal."""
    renderer = structlog.dev.ConsoleRenderer() if sys.stdout.isatty() else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout), cache_logger_on_first_use=True)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


@app.command("serve")
@command
def serve_cmd(
    gpus: Annotated[str, typer.Option("--gpus", help="auto, none, or GPU indices such as 0,1,3.")] = "auto",
    cpu_slots: Annotated[int, typer.Option("--cpu-slots", help="Experiment slots when there is no GPU.")] = 1,
    synchronous: Annotated[str, typer.Option("--synchronous", help="SQLite durability: FULL, NORMAL.")] = "FULL",
    home: HomeOpt = None,
) -> None:
    """Run the daemon: serve the home's runs on a pool of slots until SIGTERM or Ctrl-C.

    Example: rloopd serve --home /var/lib/rloopd --gpus auto
    """
    from rloopd.service import Daemon
    from rloopd.slots import SlotPool, parse_slots

    kind, names = parse_slots(gpus, cpu_slots)
    path = Path(home) if home else default_home()
    Home.open(path, synchronous=synchronous).close()  # a clear error for a bad home, before anything else
    configure_logging()
    Daemon(path, SlotPool(kind, names), synchronous=synchronous).run_forever()


def _send(home: Path | None, op: str, args: dict) -> dict:
    path = Path(home) if home else default_home()
    if not (daemon_running(path) and control.socket_path(path).exists()):
        raise DaemonError(f"no daemon serves {path}: start one with `rloopd serve --home {path}`")
    return control.call(path, op, args)


def _send_or_here(home: Path | None, op: str, args: dict, here) -> dict:
    """Through the daemon when one serves the home (it is the writer); else here, holding the home's lock."""
    path = Path(home) if home else default_home()
    if daemon_running(path) and control.socket_path(path).exists():
        return control.call(path, op, args, timeout=600)
    with Home.open(path, create=False) as h:
        lock = HomeLock(h.path)
        lock.acquire(f"rloopd {op}")
        try:
            return here(h)
        finally:
            lock.release()


def _report(result: dict, json_: bool) -> None:
    if json_:
        emit_json(result)
    else:
        out.print(f"run {result['run_id']}: {result.get('status', result.get('program', 'ok'))}")


@app.command("pause")
@command
def pause_cmd(run: RunArg, json_: JsonOpt = False, home: HomeOpt = None) -> None:
    """Pause a live run: its experiment in flight ends as interrupted; its window clock stops.

    Example: rloopd pause lr-sweep
    """
    _report(_send(home, "pause", {"run": run}), json_)


@app.command("resume")
@command
def resume_cmd(run: RunArg, json_: JsonOpt = False, home: HomeOpt = None) -> None:
    """Resume a paused or stopped run on the daemon.

    Example: rloopd resume lr-sweep
    """
    _report(_send(home, "resume", {"run": run}), json_)


@app.command("stop")
@command
def stop_cmd(run: RunArg, json_: JsonOpt = False, home: HomeOpt = None) -> None:
    """Stop a run: its experiment in flight is recorded as interrupted; `resume` can continue it.

    Example: rloopd stop lr-sweep
    """
    _report(_send(home, "stop", {"run": run}), json_)


@app.command("program")
@command
def program_cmd(run: RunArg, file: Annotated[Path, typer.Argument(help="The program file this run follows now.")],
                json_: JsonOpt = False, home: HomeOpt = None) -> None:
    """Give one run its own program file: recorded now, watched from now on.

    Example: rloopd program lr-sweep ~/programs/deeper.md
    """
    _report(_send(home, "program", {"run": run, "file": str(file.absolute())}), json_)


@app.command("backup")
@command
def backup_cmd(dest: Annotated[Path, typer.Argument(help="A new directory for the copy.")],
               json_: JsonOpt = False, home: HomeOpt = None) -> None:
    """Take a consistent copy of the home while runs go on: the log (SQLite's backup API), blobs, snapshots.

    Example: rloopd backup /mnt/backups/rloopd-2026-11-26
    """
    from rloopd.backup import backup

    with Home.open(home, create=False) as h:
        summary = backup(h, dest)
    if json_:
        emit_json(summary)
    else:
        out.print(f"backup of {summary['events']} events, {summary['blobs']} blobs in {dest}")


@app.command("archive")
@command
def archive_cmd(run: RunArg, reason: Annotated[str, typer.Option("--reason", help="Why, for the record.")] = "",
                json_: JsonOpt = False, home: HomeOpt = None) -> None:
    """Archive a finished, stopped or failed run: it leaves `rloopd status` and stays verifiable.

    Its events, blobs, commits and run directory are kept (replay and audit still pass); `rloopd gc` then
    keeps only its best checkpoint. `rloopd status --all` lists it.

    Example: rloopd archive lr-sweep --reason "superseded by lr-sweep-2"
    """
    from rloopd.housekeeping import archive_run

    def here(h: Home) -> dict:
        run_id = h.log.resolve(run)
        return {"run_id": run_id, "status": archive_run(h, run_id, reason)}

    _report(_send_or_here(home, "archive", {"run": run, "reason": reason}, here), json_)


@app.command("gc")
@command
def gc_cmd(
    keep_last: Annotated[int, typer.Option("--keep-last", help="Checkpoints kept per run besides the best.")] = 3,
    orphan_age: Annotated[float, typer.Option(
        "--orphan-age", help="Seconds before a blob no event names counts as an orphan.")] = 3600.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")] = False,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Remove blobs no event needs: checkpoints beyond the best and last K of each run, and old orphans.

    Frozen files, program versions, diffs, training logs and notes are never removed. What was removed,
    and under which rule, is recorded as `blobs.collected` in the `home` stream; `rloopd audit` still passes.

    Example: rloopd gc --keep-last 2 --dry-run
    """
    from rloopd.housekeeping import collect

    args = {"keep_last": keep_last, "orphan_age": orphan_age, "dry_run": dry_run}
    result = _send_or_here(home, "gc", args, lambda h: collect(h, keep_last, orphan_age, dry_run).as_dict())
    if json_:
        emit_json(result)
    else:
        verb = "would remove" if result["dry_run"] else "removed"
        out.print(f"{verb} {result['removed']} blobs ({result['checkpoints']} checkpoints, {result['orphans']} "
                  f"orphans), {result['bytes_freed'] / 1e6:.1f} MB; {result['kept_checkpoints']} checkpoints kept "
                  f"({result['rule']})")
