"""CLI commands for batches: `rloopd batch run FILE`, `rloopd batch status [B]` (daemon/batch.py)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from rloopd import control
from rloopd.batch import batch_info, batch_runs, create_batch, resolve_batch
from rloopd.cli import HomeOpt, JsonOpt, app, command, emit_json, err, out
from rloopd.cli_run import _no_daemon
from rloopd.home import Home
from rloopd.lock import HomeLock, daemon_running
from rloopd.loop import Loop, LoopOptions, Stop

batch_app = typer.Typer(name="batch", no_args_is_help=True, help="Batches of repeated runs: run, status.")
app.add_typer(batch_app)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def status_table(info: dict[str, Any]) -> Table:
    statistic = info["criteria"].get("statistic", "median")
    table = Table(title=f"batch {info['batch']}: {info['question']}", title_justify="left")
    for col in ("condition", "agent", "memory", "space", "runs", "finished", "running", "experiments",
                f"{statistic} best", "best"):
        table.add_column(col, justify="left" if col in ("condition", "agent", "memory", "space") else "right")
    for row in info["conditions"]:
        done = f"{row['experiments']}" + (f"/{row['cap']}" if row["cap"] is not None else "")
        table.add_row(row["condition"] + (" (baseline)" if row["condition"] == info["criteria"]["baseline"] else ""),
                      row["agent"], row["memory"], row["space"] or "lab default", str(row["runs"]), str(row["finished"]), str(row["running"]), done,
                      _fmt(row[statistic]), _fmt(row["best"]))
    return table


@batch_app.command("run")
@command
def batch_run_cmd(
    file: Annotated[Path, typer.Argument(help="The batch file (TOML).")],
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Hand the batch to the daemon and return.")] = False,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Create every run of a batch file and run them: on the daemon's slots when a daemon serves the home
    (followed here with a live table, or `--detach`), else one after another in this process.

    Example: rloopd batch run docs/example-batch.toml --detach
    """
    with Home.open(home) as h:
        served = daemon_running(h.path) and control.socket_path(h.path).exists()
        if served:
            made = control.call(h.path, "batch", {"file": str(file.absolute())})
            batch = made["batch"]
            err.print(f"batch {batch}: {len(made['runs'])} runs handed to the daemon")
            if not detach:
                info = batch_info(h, batch)
                with Live(status_table(info), console=err, refresh_per_second=2) as live:
                    while any(row["running"] for row in info["conditions"]):
                        time.sleep(0.5)
                        info = batch_info(h, batch)
                        live.update(status_table(info))
        else:
            if detach:
                raise typer.Exit(code=_no_daemon(h.path))
            batch = _run_here(h, file)
        info = batch_info(h, batch)
    emit_json(info) if json_ else out.print(status_table(info))


def _run_here(h: Home, file: Path) -> str:
    """No daemon: hold the home's lock and drive every run here, in the batch's order, with progress.
    Ctrl-C stops the run in progress cleanly; the runs not started yet stay `running`, for a daemon later."""
    lock = HomeLock(h.path)
    lock.acquire("foreground batch")
    stop = Stop()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set("stopped", by="ctrl-c"))
    try:
        batch, made = create_batch(h, file)
        err.print(f"batch {batch}: {len(made)} runs in {h.path}")
        with Progress(console=err, transient=False) as progress:
            task = progress.add_task(f"batch {batch}", total=len(made))
            for run in made:
                if stop.is_set():
                    break
                progress.update(task, description=f"batch {batch}: run {run}")
                Loop(h, run, LoopOptions(stop=stop)).run()
                progress.advance(task)
    finally:
        signal.signal(signal.SIGINT, previous)
        lock.release()
    return batch


@batch_app.command("status")
@command
def batch_status_cmd(
    batch: Annotated[str | None, typer.Argument(help="A batch id (or a unique prefix); all batches without.")] = None,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Progress of a batch per condition: runs, finished, running, experiments, the statistic of the best.

    Example: rloopd batch status 3f2a --json
    """
    with Home.open(home) as h:
        ids = [resolve_batch(h, batch)] if batch else sorted(
            s.removeprefix("batch:") for s in h.log.streams() if s.startswith("batch:"))
        infos = [batch_info(h, b) | {"runs": batch_runs(h, b)} for b in ids]
    if json_:
        emit_json(infos[0] if batch else infos)
        return
    if not infos:
        out.print("no batches in this home")
    for info in infos:
        out.print(status_table(info))
