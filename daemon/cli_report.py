"""CLI command `report`: the figures, statistics and HTML page of runs or a batch, from the log alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rloopd.cli import HomeOpt, JsonOpt, app, command, emit_json, err, out
from rloopd.home import Home


@app.command("report")
@command
def report_cmd(
    runs: Annotated[list[str] | None, typer.Argument(
        help="Runs to report (id, unique prefix or name); or use --batch.", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory to write the report into.")] = ...,
    batch: Annotated[str | None, typer.Option(
        "--batch", help="Report every run of this batch (id, batch:ID or a unique prefix).")] = None,
    baseline: Annotated[str | None, typer.Option(
        "--baseline", help="The condition the others are compared with (default: the batch's criteria, else "
                           "`random`, else the first).")] = None,
    question: Annotated[str | None, typer.Option(
        "--question", help="The question the page states (default: the batch's).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the bootstrap intervals.")] = 0,
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Write curves.png, runs.png, ideas.png, summary.json and a self-contained report.html for runs.

    Runs are grouped into conditions by the condition their batch gave them, else by what they were made
    with: agent, program, memory policy and search space (each condition names all four). Runs whose
    metric or direction differ are refused. The numbers follow DESIGN section 3 (experiments, valid ones,
    accepted-change rate, restarts, theoretical maximum); each condition is compared with the baseline by
    the difference of the final bests (median, or the batch criteria's statistic), a bootstrap interval
    and a Mann-Whitney U test. Nothing is written when an argument is bad.

    Example: rloopd report --batch 3f0c9a1e2b7d -o reports/tpe-vs-random
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from rloopd.report import FILES, write_report

    with Home.open(home, create=False) as h, Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task("reading runs", total=None)

        def step(what: str, done: int, total: int) -> None:
            progress.update(task, description=what, completed=done, total=total)

        summary = write_report(h.log, output, runs=runs or (), batch=batch, question=question,
                               baseline=baseline, seed=seed, on_progress=step)
    files = [str(output / name) for name in FILES]
    if json_:
        emit_json({"output": str(output), "files": files, "summary": summary})
        return
    print_summary(summary)
    out.print(f"wrote {', '.join(FILES)} to {output}")


def print_summary(summary: dict) -> None:
    from rich.table import Table

    from rloopd.report_render import SUMMARY_HEAD, summary_rows

    table = Table(title=f"{summary['metric']} ({summary['direction']})"
                  + (f": {summary['question']}" if summary["question"] else ""), title_justify="left")
    for col in SUMMARY_HEAD:
        table.add_column(col)
    for row in summary_rows(summary):
        table.add_row(*row)
    out.print(table)
    for c in summary["comparisons"]:
        lo, hi = c["ci"]
        out.print(f"{c['condition']} − {c['baseline']}: {c['statistic']} difference {_g(c['difference'])} "
                  f"[{_g(lo)}, {_g(hi)}], Mann-Whitney U {_g(c['u'])}, p = {_g(c['p_value'])}")
    for s in summary["skipped"]:
        err.print(f"rloopd: not reported yet: {s['run']} ({s['name']}, {s['condition']}): {s['reason']}")


def _g(x: float | None) -> str:
    return "—" if x is None else f"{x:.6g}"
