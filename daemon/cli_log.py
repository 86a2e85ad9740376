"""CLI commands that read the event log directly: `log` and `audit`."""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer

from rloopd.audit import audit as run_audit
from rloopd.cli import HomeOpt, JsonOpt, app, command, emit_json, err, fail, out
from rloopd.history import lineage
from rloopd.home import Home
from rloopd.log import Event


def summarize(e: Event, width: int = 100) -> str:
    text = json.dumps(e.data, ensure_ascii=False, separators=(", ", "="))
    return text if len(text) <= width else text[: width - 1] + "…"


@app.command("log")
@command
def log_cmd(
    stream: Annotated[str, typer.Argument(help="A run id, unique id prefix or name; `batch:<id>`; or `home`.")],
    type_: Annotated[list[str] | None, typer.Option("--type", "-t", help="Only events of this type (repeatable).")] = None,
    json_: JsonOpt = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events as they arrive.")] = False,
    home: HomeOpt = None,
) -> None:
    """Print a stream's events in order.

    Example: rloopd log my-run --type experiment.decided --json
    """
    with Home.open(home, create=False) as h:
        name = h.log.resolve(stream)
        forks = lineage(h.log, name) if name != "home" and not name.startswith("batch:") else []
        if forks:
            err.print("lineage: " + " -> ".join(f"{f['run']}@step {f['step']}" for f in forks) + f" -> {name}",
                      highlight=False, soft_wrap=True)
        events = h.log.follow(name, types=type_ or ()) if follow else h.log.read(name, types=type_ or ())
        try:
            for e in events:
                if json_:
                    emit_json(e.as_dict())
                else:
                    out.print(f"{e.seq:>6} {e.n:>5}  {e.at}  [bold]{e.type:<22}[/] {summarize(e)}",
                              markup=True, highlight=False)
        except KeyboardInterrupt:
            pass


def parse_expect(items: list[str]) -> dict[str, str]:
    expect = {}
    for item in items:
        stream, sep, digest = item.partition("=")
        if not sep or not stream or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise fail(f"--expect {item!r}: use STREAM=HASH with a 64-hex-digit head hash")
        expect[stream] = digest
    return expect


@app.command("audit")
@command
def audit_cmd(
    stream: Annotated[str | None, typer.Argument(help="Audit only this stream (default: every stream).")] = None,
    json_: JsonOpt = False,
    expect: Annotated[list[str] | None, typer.Option(
        "--expect", help="STREAM=HASH: the head hash you kept elsewhere; a mismatch fails (repeatable).")] = None,
    home: HomeOpt = None,
) -> None:
    """Verify every hash chain, stored payload and blob; print each stream's head hash.

    Exit 0 when everything verifies, 1 naming the first bad event otherwise.

    Example: rloopd audit --expect home=3f2a...c9 --json
    """
    wanted = parse_expect(expect or [])
    with Home.open(home, create=False) as h:
        streams = [h.log.resolve(stream)] if stream else None
        report = run_audit(h.log, h.blobs, streams, wanted)
    if json_:
        emit_json(report.as_dict())
    else:
        for s in report.streams:
            out.print(f"{s.stream}\t{s.events} events\thead {s.head or '-'}")
        out.print(f"{len(report.streams)} streams, {report.blobs_checked} blobs checked: "
                  + ("[green]ok[/]" if report.ok else f"[red]{len(report.problems)} problems[/]"), markup=True)
    if not report.ok:
        err.print(f"rloopd: audit failed: {report.first()}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command("replay")
@command
def replay_cmd(
    run: Annotated[str, typer.Argument(help="Run id, unique prefix or name.")],
    reexecute: Annotated[str | None, typer.Option(
        "--reexecute", metavar="STEPS",
        help="Also train these steps again (0,5,9 | 3-6 | accepted | best | all) and compare the metric.")] = None,
    tolerance: Annotated[float, typer.Option(
        "--tolerance", help="With --reexecute: the largest absolute metric difference that counts as reproduced.")
    ] = 0.01,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Rebuild a run's projections from its log and compare with the live ones; verify chains, blobs, commits.

    Exit 0 when all agree, 1 naming the first divergence. It never calls an agent and never trains, unless
    --reexecute names steps: those are trained again from their recorded commits, frozen files, seed and
    number of training steps, and exit 1 also says that one of them did not reproduce within --tolerance.

    Example: rloopd replay lr-sweep --reexecute accepted --tolerance 0.005 --json
    """
    from rloopd.reexecute import as_dicts, parse_steps, recorded_experiments
    from rloopd.reexecute import reexecute as run_again
    from rloopd.replay import replay

    with Home.open(home, create=False) as h:
        name = h.log.resolve(run)
        if reexecute is not None:  # bad steps are refused before the (quick) replay and the (slow) training
            from rloopd.history import history

            parse_steps(reexecute, recorded_experiments(history(h.log, name)), name)
        report = replay(h, name)
        again = []
        if reexecute is not None and report.ok:
            again = reexecute_with_progress(h, name, reexecute, tolerance, run_again)
    if json_:
        emit_json(report.as_dict() | ({"reexecuted": as_dicts(again), "tolerance": tolerance}
                                      if reexecute is not None else {}))
    else:
        out.print(f"run {report.run}: {report.events} events replayed; "
                  + ("[green]projections, chains, blobs, commits and manifest agree[/]" if report.ok
                     else f"[red]{len(report.divergences)} divergences[/]"), markup=True)
        if again:
            print_reexecuted(again, tolerance)
    if not report.ok:
        first = report.divergences[0]
        where = ", ".join(f"{k}={v}" for k, v in first.items() if k not in ("kind", "what"))
        err.print(f"rloopd: replay diverged: {first['kind']}: {first['what']}" + (f" ({where})" if where else ""),
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    failed = [r for r in again if not r.reproduced]
    if failed:
        err.print(f"rloopd: {len(failed)} of {len(again)} re-executed steps did not reproduce within "
                  f"{tolerance}: step {failed[0].step} recorded {failed[0].recorded} ({failed[0].recorded_status}), "
                  f"measured {failed[0].measured} ({failed[0].status})", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def reexecute_with_progress(h: Home, run: str, steps: str, tolerance: float, run_again) -> list:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("re-executing", total=None)

        def started(i: int, total: int, step: int) -> None:
            progress.update(task, total=total, completed=i, description=f"re-executing step {step}")

        results = run_again(h, run, steps, tolerance, on_start=started)
        progress.update(task, completed=len(results))
    return results


def print_reexecuted(results: list, tolerance: float) -> None:
    from rich.table import Table

    table = Table(title=f"re-executed (tolerance {tolerance})", title_justify="left")
    for col in ("step", "commit", "budget", "recorded", "measured", "difference", "reproduced"):
        table.add_column(col, justify="right" if col in ("step", "recorded", "measured", "difference") else "left")
    for r in results:
        table.add_row(str(r.step), r.commit[:10], r.budget, f"{r.recorded} ({r.recorded_status})",
                      f"{r.measured} ({r.status})", "-" if r.difference is None else f"{r.difference:+.6f}",
                      "[green]yes[/]" if r.reproduced else "[red]no[/]")
    out.print(table)
