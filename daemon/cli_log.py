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
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Rebuild a run's projections from its log and compare with the live ones; verify chains, blobs, commits.

    Exit 0 when all agree, 1 naming the first divergence. It never calls an agent and never trains.

    Example: rloopd replay lr-sweep --json
    """
    from rloopd.replay import replay

    with Home.open(home, create=False) as h:
        report = replay(h, h.log.resolve(run))
    if json_:
        emit_json(report.as_dict())
    else:
        out.print(f"run {report.run}: {report.events} events replayed; "
                  + ("[green]projections, chains, blobs, commits and manifest agree[/]" if report.ok
                     else f"[red]{len(report.divergences)} divergences[/]"), markup=True)
    if not report.ok:
        first = report.divergences[0]
        where = ", ".join(f"{k}={v}" for k, v in first.items() if k not in ("kind", "what"))
        err.print(f"rloopd: replay diverged: {first['kind']}: {first['what']}" + (f" ({where})" if where else ""),
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1)
