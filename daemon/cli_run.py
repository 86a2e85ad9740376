"""CLI commands of the research loop: run, status, show, init, demo."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live

from rloopd import control, runs, views
from rloopd.cli import HomeOpt, JsonOpt, app, command, emit_json, err, out
from rloopd.history import run_state
from rloopd.home import Home
from rloopd.lock import HomeLock, daemon_running
from rloopd.log import Event
from rloopd.loop import Loop, LoopOptions, Stop

AgentOpt = Annotated[str | None, typer.Option(
    "--agent", "-a", help="random (one constant per step), random:all, or cmd:'COMMAND {prompt_file}' "
                          "(default: the lab's [agent] spec, else random).")]


def live_table(h: Home, run: str) -> tuple[views.LiveTable, Live]:
    created = next(h.log.read(run)).data
    table = views.LiveTable(created, total=created.get("experiments"))
    return table, Live(table.render(), console=err, refresh_per_second=4, transient=False, redirect_stdout=False)


def follow_loop(h: Home, run: str) -> dict[str, Any]:
    """No daemon: hold the home's lock and drive the loop here; Ctrl-C stops the run cleanly."""
    lock = HomeLock(h.path)
    lock.acquire("foreground run")
    stop = Stop()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set("stopped", by="ctrl-c"))
    table, live = live_table(h, run)
    try:
        with live:
            def on_event(e: Event) -> None:
                table.add(e)
                live.update(table.render())

            state = Loop(h, run, LoopOptions(stop=stop, on_event=on_event)).run()
    finally:
        signal.signal(signal.SIGINT, previous)
        lock.release()
    return views.run_summary(h, state)


def follow_daemon(h: Home, run: str) -> dict[str, Any]:
    """A daemon drives the run: follow its events until it leaves `running`; Ctrl-C asks it to stop."""
    stopping = {"asked": False}

    def on_sigint(*_: Any) -> None:
        if not stopping["asked"]:
            stopping["asked"] = True
            control.call(h.path, "stop", {"run": run})

    previous = signal.signal(signal.SIGINT, on_sigint)
    table, live = live_table(h, run)
    try:
        with live:
            for e in h.log.follow(run, poll_seconds=0.1, stop=lambda: run_state(h.log, run).status != "running"):
                table.add(e)
                live.update(table.render())
    finally:
        signal.signal(signal.SIGINT, previous)
    return views.run_summary(h, run_state(h.log, run))


@app.command("run")
@command
def run_cmd(
    lab: Annotated[Path, typer.Option("--lab", help="The lab directory (holds rloop.toml).")] = Path("."),
    agent: AgentOpt = None,
    experiments: Annotated[int, typer.Option("--experiments", "-n", help="Experiments after the baseline.")] = 8,
    budget: Annotated[str | None, typer.Option("--budget", help="Seconds per experiment, or steps:N.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="The run's seed (proposals, training).")] = 0,
    name: Annotated[str | None, typer.Option("--name", help="A name to refer to the run by.")] = None,
    sandbox: Annotated[str, typer.Option("--sandbox", help="auto, bwrap, setpriv or none.")] = "auto",
    window: Annotated[str | None, typer.Option("--window", help="Active time the run may use, e.g. 4h15m.")] = None,
    memory: Annotated[str | None, typer.Option("--memory", help=(
        "What each session is shown: notes (default), none, results-only, or from:RUN[@STEP] "
        "(start with another run's notes, artifacts and best checkpoint)."))] = None,
    space: Annotated[str | None, typer.Option("--space", help=(
        "A search space preset of the lab's [spaces] (the reference lab: full, hparams, optimizer)."))] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Hand the run to the daemon and return.")] = False,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Create a run of a lab and drive it: the baseline, then N experiments.

    With a daemon serving the home (`rloopd serve`), the run is handed to it and followed here;
    `--detach` returns at once with the run id. Without one, the run is driven in this process.

    Example: rloopd run --lab . --agent random --experiments 8 --budget steps:200 --seed 1 --space hparams
    """
    with Home.open(home) as h:
        report(*drive(h, dict(lab=lab, agent=agent, experiments=experiments, budget=budget, seed=seed,
                              name=name, sandbox=sandbox, window=window, memory=memory, space=space),
                      detach=detach), json_)


def report(run: str, summary: dict[str, Any] | None, json_: bool) -> None:
    """Print a detached run's id, or a driven run's summary; exit 130 when it was stopped."""
    if summary is None:
        emit_json({"run_id": run}) if json_ else out.print(run)
        return
    if json_:
        emit_json(summary)
    else:
        views.print_summary(out, summary)
    if summary["status"] == "stopped":
        raise typer.Exit(130)


def drive(h: Home, spec: dict[str, Any], detach: bool = False, op: str = "run") -> tuple[str, dict[str, Any] | None]:
    """Create a run (`run`) or a fork (`fork`) and drive it: through the daemon serving the home if
    there is one, else here."""
    served = daemon_running(h.path) and control.socket_path(h.path).exists()
    if detach and not served:
        raise typer.Exit(code=_no_daemon(h.path))
    for key in ("lab", "program"):
        if spec.get(key) is not None:
            spec[key] = str(Path(spec[key]).absolute())
    if served:
        run = control.call(h.path, op, spec)["run_id"]
        if detach:
            return run, None
        err.print(f"run {run} handed to the daemon; following (Ctrl-C stops it)")
        return run, follow_daemon(h, run)
    if op == "fork":
        from rloopd.fork import fork_run

        program = spec.pop("program", None)
        run = fork_run(h, spec.pop("run"), spec.pop("step"), program=Path(program) if program else None, **spec)
    else:
        run = runs.create_run(h, Path(spec.pop("lab")), **spec)
    err.print(f"run {run} in {h.run_dir(run)}")
    return run, follow_loop(h, run)


@app.command("fork")
@command
def fork_cmd(
    run: Annotated[str, typer.Argument(help="The run to fork: id, unique prefix or name.")],
    step: Annotated[int, typer.Argument(help="Fork after this step; the fork's first experiment is STEP+1.")],
    name: Annotated[str | None, typer.Option("--name", help="A name for the fork.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", "-a", help="Another agent (default: the parent's).")] = None,
    program: Annotated[Path | None, typer.Option("--program", help="Another program file for the fork.")] = None,
    experiments: Annotated[int | None, typer.Option("--experiments", "-n", help="Experiments after STEP.")] = None,
    window: Annotated[str | None, typer.Option("--window", help="The fork's window, e.g. 2h.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Another seed (default: the parent's).")] = None,
    detach: Annotated[bool, typer.Option("--detach", "-d", help="Hand the fork to the daemon and return.")] = False,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Fork a run after a step: a new run from the parent's best commit and memory as of that step.

    Its history is the parent's prefix plus its own events (nothing is copied); the parent is untouched.

    Example: rloopd fork lr-sweep 37 --agent random:all --experiments 20
    """
    with Home.open(home) as h:
        report(*drive(h, dict(run=run, step=step, name=name, agent=agent, program=program,
                              experiments=experiments, window=window, seed=seed), detach=detach, op="fork"), json_)


def _no_daemon(home: Path) -> int:
    err.print(f"rloopd: error: --detach: no daemon serves {home}; start one with `rloopd serve --home {home}`",
              highlight=False, soft_wrap=True)
    return 2


@app.command("status")
@command
def status_cmd(
    all_: Annotated[bool, typer.Option("--all", help="Archived runs too.")] = False,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """List runs with their status, step, experiments and best result (archived ones with --all).

    Example: rloopd status --json
    """
    with Home.open(home, create=False) as h:
        rows = views.status_rows(h, archived=all_)
        dashboard = None
        if daemon_running(h.path) and control.socket_path(h.path).exists():
            reply = control.call(h.path, "status", timeout=10)
            live, dashboard = reply["runs"], reply.get("dashboard")
            for row in rows:
                row["live"] = live.get(row["run_id"])
    if json_:
        emit_json(rows)
    else:
        out.print(views.status_table(rows))
        for r in rows:
            stalled = (r.get("live") or {}).get("stalled")
            if stalled:
                out.print(f"[red]waiting:[/] run {r['run_id']} ({r['name']}) is waiting for space and takes no work "
                          f"until there is: {stalled['why']}", markup=True, highlight=False, soft_wrap=True)
            for warning in dict.fromkeys(r["warnings"]):
                out.print(f"[yellow]warning:[/] run {r['run_id']} ({r['name']}): {warning}", markup=True,
                          highlight=False, soft_wrap=True)
        if dashboard:
            out.print(f"dashboard: {dashboard} (`rloopd dashboard` prints the link with its token)", markup=False)


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
    space: Annotated[str | None, typer.Option("--space", help=(
        "The search space the new lab's runs use by default: hparams, optimizer or full."))] = None,
) -> None:
    """Start a new lab from the reference one: program.md, rloop.toml, workspace/, frozen/.

    Example: rloopd init ~/labs/my-lab --space hparams && rloopd run --lab ~/labs/my-lab
    """
    from rloopd.reference import copy_reference_lab

    copy_reference_lab(directory, space=space)
    chosen = f" (search space: {space})" if space else ""
    out.print(f"new lab in {directory}{chosen}: edit program.md and rloop.toml, then `rloopd run --lab {directory}`")


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
        err.print(f"demo: the reference lab, random search, {experiments} experiments of {budget} s after the baseline")
        run, summary = drive(h, dict(lab=reference_lab_dir(), agent="random", experiments=experiments,
                                     budget=budget, seed=seed, name=None))
        views.print_summary(out, summary)
        out.print(views.results_table(h, run))
        out.print(f"run directory: {h.run_dir(run)}")
        out.print(f"inspect: rloopd log {run} --home {h.path}   rloopd show {run} {summary['best_step']} --home {h.path}")
