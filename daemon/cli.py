"""The command line: parse, call one library function, print; domain errors become one line and an exit code."""

from __future__ import annotations

import functools
import json
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from rloopd import __version__
from rloopd.errors import AuditFailed, HomeError, RloopdError, one_line

app = typer.Typer(
    name="rloopd", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    help="An event-sourced daemon that runs autonomous ML research loops.",
)
out = Console(highlight=False, soft_wrap=True, emoji=False)  # ":name:" in a run name or path stays text
err = Console(stderr=True, highlight=False, emoji=False)

HomeOpt = Annotated[Path | None, typer.Option(
    "--home", envvar="RLOOPD_HOME", show_envvar=True, readable=False,  # Home.open says what access it needs
    help="State directory (default: $XDG_STATE_HOME/rloopd, else ~/.local/state/rloopd).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON to stdout (progress goes to stderr).")]


def fail(message: str, code: int = 2) -> typer.Exit:
    from rich.markup import escape

    err.print(f"[bold red]rloopd: error:[/] {escape(one_line(message))}", markup=True, highlight=False,
              soft_wrap=True)
    return typer.Exit(code)


def damage(home: Path | None) -> str | None:
    """The first problem `rloopd audit` finds in the home's event log (its blobs aside), as one line; None
    when the log verifies or cannot be read, so that a failure that is not about damage stays a bug."""
    from rloopd.audit import audit
    from rloopd.home import default_home
    from rloopd.log import EventLog

    try:
        db = (Path(home) if home is not None else default_home()).expanduser().absolute() / "events.db"
        with EventLog.open(db, create=False) as log:
            first = audit(log, None).first()
    except Exception:  # noqa: BLE001 - no verdict: the original error stands
        return None
    return None if first is None else f"the event log is damaged: {first} (`rloopd audit` lists every problem)"


def command(fn: Any) -> Any:
    """Turn named errors into one line on stderr and their exit code, never a traceback. A command that
    fails on an event of an unexpected shape says which event is damaged (exit 1, as audit does)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RloopdError as e:
            raise fail(str(e), e.exit_code) from None
        except sqlite3.OperationalError as e:
            raise fail(f"event log: {e}", HomeError.exit_code) from None
        except BrokenPipeError:
            sys.stderr.close()
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # a reader met an event that is not what its type promises (a key missing, a
            # value of another type): on this failure path only, the log is audited to tell damage from a bug
            found = damage(kwargs.get("home")) if "home" in kwargs and not hasattr(e, "exit_code") else None
            if found is None:
                raise
            raise fail(found, AuditFailed.exit_code) from None

    return wrapper


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def version_callback(value: bool) -> None:
    if value:
        out.print(f"rloopd {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """rloopd runs autonomous ML research loops and records every step in an append-only, hash-chained log."""


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def main() -> None:
    """Run the CLI; usage errors too become one line on stderr and exit 2, never a box or a traceback."""
    for arg in sys.argv[1:]:  # bytes that are not UTF-8 arrive as lone surrogates, which no log can store
        if not _utf8(arg):
            err.print(f"rloopd: error: argument '{one_line(arg)}' is not valid UTF-8 (rloopd records its "
                      "arguments as UTF-8 text)", markup=False, highlight=False, soft_wrap=True)
            sys.exit(2)
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        err.print("rloopd: aborted", highlight=False)
        code = 130
    except Exception as e:  # typer vendors click: match its exceptions by shape, not by import path
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        ctx = getattr(e, "ctx", None)
        if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            code = 0
        else:
            where = f"{ctx.command_path}: " if ctx is not None else ""
            err.print(f"rloopd: error: {one_line(where + e.format_message())}", markup=False, highlight=False,
                      soft_wrap=True)
            code = e.exit_code
    sys.exit(code or 0)


# Command modules register themselves on `app`; imported last so that they can import from here.
from rloopd import (  # noqa: E402,F401
    cli_batch,
    cli_daemon,
    cli_log,
    cli_noise,
    cli_report,
    cli_run,
    cli_session,
    cli_tracker,
    cli_transfer,
)
