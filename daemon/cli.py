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
from rloopd.errors import HomeError, RloopdError

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

    err.print(f"[bold red]rloopd: error:[/] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def command(fn: Any) -> Any:
    """Turn named errors into one line on stderr and their exit code, never a traceback."""

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


def main() -> None:
    """Run the CLI; usage errors too become one line on stderr and exit 2, never a box or a traceback."""
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
            err.print(f"rloopd: error: {where}{e.format_message()}", markup=False, highlight=False, soft_wrap=True)
            code = e.exit_code
    sys.exit(code or 0)


# Command modules register themselves on `app`; imported last so that they can import from here.
from rloopd import cli_batch, cli_daemon, cli_log, cli_noise, cli_report, cli_run, cli_session, cli_transfer  # noqa: E402,F401
