"""CLI commands an agent runs inside its session: `submit` and `result`, through the run's own socket."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from rloopd import runsocket
from rloopd.cli import JsonOpt, app, command, emit_json, out
from rloopd.errors import DaemonError

SOCKET_ENV = "RLOOPD_SOCKET"


def _socket() -> str:
    path = os.environ.get(SOCKET_ENV)
    if not path:
        raise DaemonError(f"{SOCKET_ENV} is not set: `rloopd submit` and `rloopd result` run inside an agent "
                          f"session, which rloopd starts with it")
    return path


def print_result(r: dict[str, Any]) -> None:
    if r.get("pending"):
        out.print(f"ticket {r['ticket']}: step {r.get('step', '?')} is running; `rloopd result {r['ticket']}` "
                  f"waits for it")
        return
    metric = r.get("metric", "val_bpb")
    verdict = "ACCEPTED (new best)" if r.get("accepted") else "rejected: the workspace is back at the best version"
    lines = [f"step {r['step']}: {r['status']}, {metric} {r.get('value')}; {verdict}",
             f"best so far: {metric} {r.get('best')} (step {r.get('best_step')})"]
    if r.get("reason"):
        lines.append(f"why: {r['reason']}")
    if r.get("window_left") is not None:
        lines.append(f"time left in the window: {r['window_left'] / 60:.1f} minutes")
    if r.get("program_changed"):
        lines.append("program.md changed since this session began: read it again")
    out.print("\n".join(lines), markup=False, highlight=False)


@app.command("submit")
@command
def submit_cmd(
    message: Annotated[str, typer.Option("--message", "-m", help="What you changed and why.")],
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return a ticket at once; `rloopd result` waits.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Run an experiment on the current workspace and print its result (inside an agent session).

    Exit 0 whenever the experiment completed, accepted or not; 2 when it could not run (another one is
    running, the window has closed).

    Example: rloopd submit -m "halve the learning rate: the loss curve oscillates"
    """
    runsocket.submit_message(message)  # what the run would refuse, refused before connecting
    result = runsocket.call(_socket(), "submit", {"message": message, "wait": not no_wait})
    emit_json(result) if json_ else print_result(result)


@app.command("result")
@command
def result_cmd(
    ticket: Annotated[str | None, typer.Argument(help="A ticket from `submit --no-wait` (default: the latest).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Wait for a submitted experiment and print its result (inside an agent session).

    Example: rloopd result 3f2a9c
    """
    result = runsocket.call(_socket(), "result", {"ticket": ticket})
    emit_json(result) if json_ else print_result(result)
