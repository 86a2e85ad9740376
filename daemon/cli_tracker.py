"""CLI command that writes runs into an experiment tracker: `export-mlflow`.

mlflow is imported inside the command (by rloopd.export_tracker.open_mlflow), never at module level: it is
an optional extra and slow to import, and `rloopd --help` or any other command must not pay for it.
"""

from __future__ import annotations

from typing import Annotated

import typer

from rloopd.cli import HomeOpt, JsonOpt, app, command, emit_json, err, out
from rloopd.home import Home


@app.command("export-mlflow")
@command
def export_mlflow_cmd(
    runs: Annotated[list[str], typer.Argument(help="Run ids, unique prefixes or names.")],
    tracking_uri: Annotated[str, typer.Option(
        "--tracking-uri", envvar="MLFLOW_TRACKING_URI", show_envvar=True,
        help="Where to write: sqlite:///FILE.db (made if missing), or an MLflow server's http(s):// URL.")
    ] = "sqlite:///mlflow.db",
    experiment: Annotated[str, typer.Option(
        "--experiment", help="The MLflow experiment to write into (made if missing).")] = "rloopd",
    json_: JsonOpt = False,
    home: HomeOpt = None,
) -> None:
    """Write each run into MLflow: params, per-step metrics, tags, notes, results and report figures.

    The lab's metric (under its own name), best_<metric> and accepted (0/1) are logged at each
    experiment's step; a fork carries its parent's steps. Exporting again adds only what the MLflow run
    lacks (it is found by its tag rloopd.run_id), so a run that moved on gets its new steps and nothing is
    doubled; artifacts are replaced under the same names. Needs the extra: pip install 'rloopd\\[mlflow]'.

    Example: rloopd export-mlflow lr-sweep lr-sweep-fork37 --tracking-uri sqlite:///mlflow.db
    """
    from rloopd.export_tracker import export_mlflow

    with Home.open(home, create=False) as h:
        results = export_mlflow(h, runs, tracking_uri, experiment)
    if json_:
        emit_json({"tracking_uri": tracking_uri, "runs": results})
        return
    for r in results:
        changed = r["metrics_added"] or r["params_added"] or r["artifacts"]
        what = "created" if r["created"] else "updated" if changed else "unchanged"
        out.print(f"run {r['run']} ({r['name']}, {r['status']}) -> MLflow run {r['mlflow_run_id']} in experiment "
                  f"{r['experiment']!r}: {what}; {r['metrics_added']} of {r['metric_points']} metric points "
                  f"and {r['params_added']} params added" + (f"; artifacts {', '.join(r['artifacts'])}"
                                                             if r["artifacts"] else ""))
    if tracking_uri.startswith("sqlite:"):
        err.print(f"browse them with: mlflow ui --backend-store-uri {tracking_uri} (the UI is in the full mlflow "
                  "package, not in mlflow-skinny)", highlight=False, soft_wrap=True)
