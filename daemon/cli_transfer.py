"""CLI commands that move a run between homes: `export` and `import`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rloopd import control
from rloopd.cli import HomeOpt, JsonOpt, app, command, emit_json, err, out
from rloopd.cli_log import parse_expect
from rloopd.home import Home
from rloopd.lock import HomeLock, daemon_running

IMPORT_TIMEOUT = 3600.0  # seconds the CLI waits for a daemon to verify and import a large archive


def _size(n: float) -> str:
    units = ["B", "KiB", "MiB", "GiB"]
    while n >= 1024 and len(units) > 1:
        n, units = n / 1024, units[1:]
    return f"{n:.0f} B" if units[0] == "B" else f"{n:.1f} {units[0]}"


@app.command("export")
@command
def export_cmd(
    run: Annotated[str, typer.Argument(help="Run id, unique prefix or name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The archive file to write (replaced whole).")],
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Write one self-contained archive of a run that another home can import and replay.

    It holds the run's history (a fork's parent prefix included), every blob and snapshot commit it names,
    and each stream's head hash; the log is verified as it is written. Keep the printed head hashes
    elsewhere: `rloopd import FILE --expect STREAM=HASH` checks them.

    Example: rloopd export lr-sweep -o lr-sweep.rloop
    """
    from rloopd.transfer import export_run

    with Home.open(home, create=False) as h:
        summary = export_run(h, run, output)
    if json_:
        emit_json(summary)
        return
    out.print(f"{summary['file']}: {_size(summary['bytes'])}; run {summary['run']} ({summary['name']}): "
              f"{summary['events']} events in {len(summary['streams'])} streams, {summary['blobs']} blobs, "
              f"{summary['commits']} commits" + (f", {summary['collected']} checkpoints collected by gc"
                                                  if summary["collected"] else ""))
    for s in summary["streams"]:
        out.print(f"head {s['stream']} {s['head']}  ({s['events']} events)")


@app.command("import")
@command
def import_cmd(
    file: Annotated[Path, typer.Argument(help="An archive written by `rloopd export`.")],
    expect: Annotated[list[str] | None, typer.Option(
        "--expect", help="STREAM=HASH: a head hash the sender published; a mismatch refuses the archive.")] = None,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Verify an archive whole, then add its run to this home, ready for `rloopd replay` and `rloopd audit`.

    Every member digest, event hash and chain (fork links included), head hash, blob and commit is checked
    before anything is written; an altered archive is refused with the reason (exit 1) and the home stays
    as it was. Importing the same archive again adds nothing. With a daemon serving the home, the daemon
    imports it; the imported run is a record, not driven here (fork it to continue it).

    Example: rloopd import lr-sweep.rloop --expect 3f0c9a1e2b7d=5be1...c9
    """
    from rloopd.transfer import import_archive

    wanted = parse_expect(expect or [])
    with Home.open(home) as h:
        if daemon_running(h.path) and control.socket_path(h.path).exists():
            result = control.call(h.path, "import", {"file": str(file.absolute()), "expect": wanted},
                                  timeout=IMPORT_TIMEOUT)
        else:  # no daemon: write directly, holding the home's lock as a foreground run does
            lock = HomeLock(h.path)
            lock.acquire("import")
            try:
                result = import_archive(h, file, wanted)
            finally:
                lock.release()
    if json_:
        emit_json(result)
        return
    added = result["added"]
    if result["already_present"]:
        out.print(f"run {result['run']} ({result['name']}) from {result['file']} is already present: nothing added")
        return
    out.print(f"imported run {result['run']} ({result['name']}) from {result['file']}: {added['events']} events in "
              f"{len(added['streams'])} streams, {added['blobs']} blobs, {added['commits']} commits")
    err.print(f"check it with: rloopd replay {result['run']}", highlight=False)
