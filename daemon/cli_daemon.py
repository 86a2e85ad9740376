"""CLI commands that talk to the daemon: serve, pause, resume, stop, program, dashboard, backup."""

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
    gpus: Annotated[str | None, typer.Option(
        "--gpus", help="auto, none, or GPU indices such as 0,1,3 (default: auto).")] = None,
    cpu_slots: Annotated[int | None, typer.Option(
        "--cpu-slots", help="Experiment slots when there is no GPU (default: 1).")] = None,
    synchronous: Annotated[str | None, typer.Option(
        "--synchronous", help="SQLite durability: FULL, NORMAL (default: FULL).")] = None,
    max_db_mb: Annotated[float | None, typer.Option(
        "--max-db-mb", help="Cap events.db at this many MiB; at the cap runs wait (default: no cap).")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", help="Settings file (default: <home>/rloopd.toml if present); a flag wins over it.")] = None,
    executor: Annotated[str | None, typer.Option(
        "--executor", help="Where experiments run: local, or ray (tasks on a Ray cluster; default: local).")] = None,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", metavar="HOST:PORT", help="With --executor ray: the cluster's GCS, e.g. 10.0.0.1:6379 "
        "(default: auto, the cluster this machine joined with `ray start`).")] = None,
    http: Annotated[str | None, typer.Option(
        "--http", metavar="HOST:PORT", help="Serve the live dashboard here, e.g. 127.0.0.1:8765; loopback only "
        "unless --http-allow-remote (default: off). `rloopd dashboard` prints its link.")] = None,
    http_allow_remote: Annotated[bool | None, typer.Option(
        "--http-allow-remote", help="Let --http listen on an address other than loopback (put TLS in front).")
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Run the daemon: serve the home's runs on a pool of slots until SIGTERM or Ctrl-C.

    Settings come from flags, else rloopd.toml (`--config`, else the home's), else defaults (README.md).

    Example: rloopd serve --home /var/lib/rloopd --gpus auto --max-db-mb 4096
    """
    from rloopd.config import cap_reached, settings
    from rloopd.service import Daemon, storage_full
    from rloopd.slots import SlotPool, parse_slots

    path = (Path(home) if home else default_home()).expanduser().absolute()
    cfg = settings(config, path, gpus=gpus, cpu_slots=cpu_slots, synchronous=synchronous, max_db_mb=max_db_mb,
                   http=http, http_allow_remote=http_allow_remote, executor=executor, ray_address=ray_address)
    kind, names = parse_slots(cfg.gpus, cfg.cpu_slots) if cfg.executor == "local" else ("", [])
    Home.open(path, synchronous=cfg.synchronous).close()  # a clear error for a bad home, before anything else
    cluster = None
    if cfg.executor == "ray":  # experiments run as Ray tasks; the slots cap them at the cluster's size
        from rloopd.config import where
        from rloopd.ray_executor import connect

        cluster = connect(cfg.ray_address, where(cfg, "ray_address"))
        kind, names = cluster.slots()
    configure_logging()
    if cluster is not None:
        structlog.get_logger("rloopd.daemon").info("executor", executor=cluster.describe(), slots=len(names))
        if not cluster.authenticated:
            structlog.get_logger("rloopd.daemon").warning(
                "ray: token authentication is off; whoever reaches the cluster's ports can run code on it "
                "(README: Running on a Ray cluster)")
    try:
        Daemon(path, SlotPool(kind, names), cfg, execute=cluster.run if cluster else None).run_forever()
    except Exception as e:  # full before it could record its start: at the cap, say which setting to raise
        why = storage_full(e)
        if why is None:
            raise
        raise DaemonError(f"cannot start: {cap_reached(cfg, path, why)}") from None


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


@app.command("dashboard")
@command
def dashboard_cmd(json_: JsonOpt = False, home: HomeOpt = None) -> None:
    """Print the link to the live dashboard, token included, of the daemon that serves the home.

    The daemon serves it when started with `--http` (or `http` in rloopd.toml); the link opens it in a browser
    on this machine (README "The dashboard").

    Example: rloopd serve --http 127.0.0.1:8765 & xdg-open "$(rloopd dashboard)"
    """
    result = _send(home, "dashboard", {})
    if json_:
        emit_json(result)
    else:
        out.print(result["link"], markup=False, highlight=False)


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
