"""`rloopd noise`: measure a lab's rerun noise (daemon/noise.py) and suggest a margin."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from rloopd.cli import JsonOpt, app, command, emit_json, err, out


@app.command("noise")
@command
def noise_cmd(
    lab: Annotated[Path, typer.Argument(help="The lab directory (holds rloop.toml).")] = Path("."),
    repeats: Annotated[int, typer.Option("--repeats", "-n", help="Runs of the baseline, each with another seed.")] = 5,
    budget: Annotated[str | None, typer.Option("--budget", help="Seconds per run, or steps:N (default: the lab's).")]
    = None,
    seed: Annotated[int, typer.Option("--seed", help="Where the seeds start (as a run's --seed).")] = 0,
    sandbox: Annotated[str, typer.Option("--sandbox", help="auto, bwrap, setpriv or none.")] = "auto",
    json_: JsonOpt = False,
) -> None:
    """Run a lab's baseline N times with different seeds at fixed code and report the spread of its metric.

    Prints the mean, the standard deviation, the smallest and largest value, and a suggested margin for
    rloop.toml (two standard deviations: `accept = "margin:X"`), or use `accept = "rerun:K"`. No daemon is
    needed and no home is written: the runs happen in a scratch home that is removed afterwards.

    Example: rloopd noise . --repeats 8 --budget steps:200 --json
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from rloopd.noise import measure
    from rloopd.runner import Interrupted

    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())  # Ctrl-C ends the run in flight cleanly
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("measuring noise", total=repeats)

            def started(i: int, total: int) -> None:
                progress.update(task, completed=i, description=f"baseline run {min(i + 1, total)} of {total}")

            result = measure(lab, repeats, budget=budget, seed=seed, sandbox=sandbox, on_start=started, stop=stop)
    except Interrupted:
        err.print("rloopd: noise: interrupted", highlight=False)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    if json_:
        emit_json(result.as_dict())
    else:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.6g}"

        out.print(f"lab {result.lab}: {result.metric} ({result.direction}), budget {result.budget}, "
                  f"{result.ok} of {result.repeats} runs completed")
        for s, st, v in zip(result.seeds, result.statuses, result.values, strict=True):
            out.print(f"  seed {s:>10}  {st:<8} {fmt(v)}")
        out.print(f"mean {fmt(result.mean)}  sd {fmt(result.std)}  min {fmt(result.min)}  max {fmt(result.max)}")
        if result.suggested_accept is not None:
            out.print(f'suggested margin {fmt(result.suggested_margin)} (2 sd): accept = "{result.suggested_accept}" '
                      "in rloop.toml, or accept = \"rerun:K\" to re-run each winner K times")
    if result.ok < 2:
        raise typer.Exit(1)
