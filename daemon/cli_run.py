"""CLI commands of the research loop: run, status, show, init, demo."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live

from rloopd import runs, views
from rloopd.cli import HomeOpt, JsonOpt, app, command, emit_json, err, out
from rloopd.home import Home
from rloopd.log import Event
from rloopd.loop import Loop, LoopOptions, Stop

AgentOpt = Annotated[str, typer.Option("--agent", "-a", help="random (one constant per step) or random:all.")]


def follow_loop(h: Home, run: str) -> dict[str, Any]:
    """Run the loop in the foreground with a live table on stderr; Ctrl-C stops the run cleanly."""
    stop = Stop()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set("stopped", by="ctrl-c"))
    created = next(h.log.read(run)).data
    table = views.LiveTable(created, total=created.get("experiments"))
    try:
        with Live(table.render(), console=err, refresh_per_second=4, transient=False,
                  redirect_stdout=False) as live:
            def on_event(e: Event) -> None:
                table.add(e)
                live.update(table.render())

            state = Loop(h, run, LoopOptions(stop=stop, on_event=on_event)).run()
    finally:
        signal.signal(signal.SIGINT, previous)
    return views.run_summary(h, state)


@app.command("run")
@command
def run_cmd(
    lab: Annotated[Path, typer.Option("--lab", help="The lab directory (holds rloop.toml).")] = Path("."),
    agent: AgentOpt = "random",
    experiments: Annotated[int, typer.Option("--experiments", "-n", help="Experiments after the baseline.")] = 8,
    budget: Annotated[str | None, typer.Option("--budget", help="Seconds per experiment, or steps:N.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="The run's seed (proposals, training).")] = 0,
    name: Annotated[str | None, typer.Option("--name", help="A name to refer to the run by.")] = None,
    sandbox: Annotated[str, typer.Option("--sandbox", help="auto, bwrap, setpriv or none.")] = "auto",
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Create a run of a lab and drive it in the foreground: the baseline, then N experiments.

    Example: rloopd run --lab . --agent random --experiments 8 --budget steps:200 --seed 1
    """
    with Home.open(home) as h:
        run = runs.create_run(h, lab, agent=agent, experiments=experiments, budget=budget, seed=seed,
                              name=name, sandbox=sandbox)
        err.print(f"run {run} in {h.run_dir(run)}")
        summary = follow_loop(h, run)
    if json_:
        emit_json(summary)
    else:
        views.print_summary(out, summary)
    if summary["status"] == "stopped":
        raise typer.Exit(130)


@app.command("status")
@command
def status_cmd(json_: JsonOpt = False, home: HomeOpt = None) -> None:
    """List runs with their status, step, experiments and best result.

    Example: rloopd status --json
    """
    with Home.open(home, create=False) as h:
        rows = views.status_rows(h)
    if json_:
        emit_json(rows)
    else:
        out.print(views.status_table(rows))


@app.command("show")
@command
def show_cmd(
    run: Annotated[str, typer.Argument(help="Run id, unique prefix or name.")],
    step: Annotated[int, typer.Argument(help="The step (0 is the baseline).")],
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """One experiment: metrics, decision, description and the diff against its parent commit.

    Example: rloopd show my-run 3
    """
    with Home.open(home, create=False) as h:
        detail = views.step_detail(h, h.log.resolve(run), step)
    if json_:
        emit_json(detail)
    else:
        views.print_step(out, detail)


@app.command("init")
@command
def init_cmd(
    directory: Annotated[Path, typer.Argument(help="Where the new lab goes (must not exist or be empty).")],
) -> None:
    """Start a new lab from the reference one: program.md, rloop.toml, workspace/, frozen/.

    Example: rloopd init ~/labs/my-lab && rloopd run --lab ~/labs/my-lab
    """
    from rloopd.reference import copy_reference_lab

    copy_reference_lab(directory)
    out.print(f"new lab in {directory}: edit program.md and rloop.toml, then `rloopd run --lab {directory}`")


@app.command("demo")
@command
def demo_cmd(
    experiments: Annotated[int, typer.Option("--experiments", "-n")] = 8,
    budget: Annotated[str, typer.Option("--budget")] = "12",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    home: HomeOpt = None,
) -> None:
    """Run the reference lab with random search on CPU, then print the results and the run's directory.

    Example: rloopd demo --experiments 8 --budget 12
    """
    from rloopd.reference import reference_lab_dir

    with Home.open(home) as h:
        run = runs.create_run(h, reference_lab_dir(), agent="random", experiments=experiments, budget=budget,
                              seed=seed, name=None)
        err.print(f"demo: the reference lab, random search, {experiments} experiments of {budget} s after the baseline")
        summary = follow_loop(h, run)
        views.print_summary(out, summary)
        out.print(views.results_table(h, run))
        out.print(f"run directory: {h.run_dir(run)}")
        out.print(f"inspect: rloopd log {run} --home {h.path}   rloopd show {run} {summary['best_step']} --home {h.path}")
