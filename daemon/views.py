"""What the read commands show: summaries, tables and step details built from the log and projections."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from rloopd.errors import StepNotFound
from rloopd.history import run_state
from rloopd.home import Home
from rloopd.inherit import describe as describe_memory
from rloopd.lab import space_label
from rloopd.log import Event
from rloopd.memory.experiments import ExperimentsTable
from rloopd.memory.state import RunState


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def floor_of(metrics: dict[str, Any], metric: str) -> float | None:
    """The lab's floor for its metric where it reports one (the reference lab: oracle_bpb for val_bpb)."""
    return metrics.get("oracle_" + metric.split("_")[-1])


class LiveTable:
    """The foreground run's live view: a progress bar over experiments and one row per finished step."""

    def __init__(self, created: dict[str, Any], total: int | None):
        self.metric, self.total = created.get("metric", "val_bpb"), total
        self.rows: dict[int, dict[str, Any]] = {}
        self.best: float | None = None

    def add(self, e: Event) -> None:
        d = e.data
        if e.type.startswith("experiment.") and d.get("replica", 0):
            return  # rerun:K's replicas of a step: its decision shows their mean
        if e.type == "experiment.started":
            self.rows[d["step"]] = {"step": d["step"], "description": d.get("description", ""), "status": "running"}
        elif e.type == "experiment.finished" and d["step"] in self.rows:
            self.rows[d["step"]].update(status=d["status"], value=d["metrics"].get(self.metric),
                                        seconds=d.get("wall_seconds"))
        elif e.type == "experiment.decided" and d["step"] in self.rows:
            self.rows[d["step"]]["accepted"] = d["accepted"]
            self.best = d.get("best_after")

    def render(self) -> Group:
        table = Table(title=None, expand=False)
        for col in ("step", "description", self.metric, "status", "kept", "s"):
            table.add_column(col, justify="right" if col in ("step", self.metric, "s") else "left")
        for r in list(self.rows.values())[-12:]:
            kept = {True: "[green]yes[/]", False: "no"}.get(r.get("accepted"), "")
            table.add_row(str(r["step"]), r["description"][:60], _fmt(r.get("value")), r["status"], kept,
                          _fmt(r.get("seconds")))
        done = sum(1 for r in self.rows.values() if r["step"] >= 1 and "accepted" in r)
        parts: list[Any] = [table]
        if self.total:
            parts.append(Text(f"experiments {done}/{self.total}   best {self.metric} {_fmt(self.best)}"))
            parts.append(ProgressBar(total=self.total, completed=done, width=50))
        return Group(*parts)


def run_summary(h: Home, state: RunState) -> dict[str, Any]:
    """The JSON object `rloopd run --json` ends with."""
    metric = state.metric
    floor = None
    for e in h.log.read(state.run, types=["experiment.finished"]):
        floor = floor_of(e.data["metrics"], metric) or floor
    return {"run_id": state.run, "name": state.name, "status": state.status, "metric": metric,
            "direction": state.direction, "experiments": state.experiments, "valid": state.valid,
            "accepted": state.accepted, "best": state.best, "best_step": state.best_step,
            "best_commit": state.best_commit, "floor": floor, "run_dir": str(h.run_dir(state.run))}


def print_summary(console: Console, s: dict[str, Any]) -> None:
    gap = "" if s["best"] is None or s["floor"] is None else f" ({s['best'] - s['floor']:+.4f} from the floor)"
    console.print(f"run {s['run_id']} ({s['name']}): {s['status']}; {s['experiments']} experiments, "
                  f"{s['valid']} valid, {s['accepted']} accepted")
    console.print(f"best {s['metric']} {_fmt(s['best'])} at step {s['best_step']}; floor {_fmt(s['floor'])}{gap}")


def status_rows(h: Home, archived: bool = False) -> list[dict[str, Any]]:
    """One row per run; archived runs only when asked for."""
    rows = []
    for created in h.log.runs():
        st = run_state(h.log, created.stream)
        if st.status == "archived" and not archived:
            continue
        parent = created.data.get("parent")
        rows.append({"run_id": st.run, "name": st.name, "status": st.status, "agent": created.data["agent"],
                     "parent": None if not parent else {"run": parent["run"], "step": parent["step"]},
                     "step": st.step, "experiments": st.experiments, "accepted": st.accepted,
                     "metric": st.metric, "direction": st.direction, "best": st.best, "best_step": st.best_step, "created": created.at,
                     "sandbox": created.data.get("sandbox"), "memory": describe_memory(created.data),
                     "memory_policy": created.data.get("memory_policy") or "notes",
                     "space": space_label(created.data.get("search_space")),
                     "search_space": created.data.get("search_space") or {},
                     "warnings": [e.data["message"] for e in h.log.read(created.stream, types=["run.warned"])]})
    return rows


def status_table(rows: list[dict[str, Any]]) -> Table:
    table = Table()
    # memory and space are shown where they are not the defaults, so a terminal of 80 columns stays readable
    memory = any(r["memory_policy"] != "notes" for r in rows)
    space = len({r["space"] for r in rows}) > 1 or any((r["search_space"] or {}).get("regions") for r in rows)
    cols = ["run", "name", "status", "agent", *(["memory"] if memory else []), *(["space"] if space else []),
            "from", "step", "exps", "kept", "best", "slot", "elapsed"]
    for col in cols:
        table.add_column(col, no_wrap=col in ("run", "best"))
    for r in rows:
        live = r.get("live") or {}
        origin = f"{r['parent']['run']}@{r['parent']['step']}" if r.get("parent") else "-"
        status = r["status"] + (" (waiting for space)" if live.get("stalled") else "")
        table.add_row(r["run_id"], r["name"], status, r["agent"], *([r["memory"]] if memory else []),
                      *([r["space"]] if space else []), origin, str(r["step"]), str(r["experiments"]),
                      str(r["accepted"]), f"{r['metric']} {_fmt(r['best'])}", ",".join(live.get("slot") or []) or "-",
                      f"{live['elapsed']:.0f} s" if live.get("elapsed") is not None else "-")
    return table


def step_detail(h: Home, run: str, step: int) -> dict[str, Any]:
    events = [e for e in h.log.read(run) if e.data.get("step") == step and e.type.startswith(("experiment.", "checkpoint."))
              and not e.data.get("replica")]  # the proposal (replica 0); rerun:K's replicas are in the decision
    started = [e for e in events if e.type == "experiment.started"]
    if not started:
        raise StepNotFound(f"run {run} has no step {step}")
    last = started[-1].data
    finished = [e.data for e in events if e.type == "experiment.finished" and e.data["attempt"] == last["attempt"]]
    decided = [e.data for e in events if e.type == "experiment.decided"]
    diff = h.blobs.get_text(last["diff_blob"]) if last.get("diff_blob") else ""
    return {"run_id": run, "step": step, "attempt": last["attempt"], "commit": last["commit"],
            "description": last.get("description", ""), "category": last.get("category"),
            "params": last.get("params", {}), "status": finished[-1]["status"] if finished else "running",
            "metrics": finished[-1]["metrics"] if finished else {},
            "reason": finished[-1].get("reason") if finished else None,
            "wall_seconds": finished[-1].get("wall_seconds") if finished else None,
            "decision": decided[-1] if decided else None, "diff": diff,
            "warm_start": {"offered": last["warm_start_blob"], "used": finished[-1].get("warm_started") if finished
                           else None} if last.get("warm_start_blob") else None}


def print_step(console: Console, d: dict[str, Any]) -> None:
    console.print(f"[bold]step {d['step']}[/] (attempt {d['attempt']}) commit {d['commit'][:12]}: {d['description']}")
    console.print(f"status {d['status']}  category {d['category'] or '-'}  wall {_fmt(d['wall_seconds'])} s")
    if d.get("reason"):
        console.print(f"  why: {d['reason']}", markup=False, highlight=False)
    for k, v in sorted(d["metrics"].items()):
        console.print(f"  {k}: {_fmt(v)}")
    if d.get("warm_start"):
        ws = d["warm_start"]
        used = {True: "loaded it", False: "did not load it", None: "-"}[ws["used"]]
        console.print(f"warm start: offered checkpoint {ws['offered'][:12]}; train(ctx) {used}")
    if d["decision"]:
        dec = d["decision"]
        console.print(f"decision: {'accepted' if dec['accepted'] else 'rejected'} ({dec['reason']}); "
                      f"best {_fmt(dec['best_before'])} -> {_fmt(dec['best_after'])}")
    if d["diff"]:
        console.print(d["diff"], markup=False, highlight=False)


def results_table(h: Home, run: str) -> Table:
    table = Table(title="results")
    rows = ExperimentsTable(h.log).rows(run)
    metric = next(h.log.read(run, until_n=0)).data.get("metric", "val_bpb")
    for col in ("step", metric, "status", "kept", "description"):
        table.add_column(col)
    for r in rows:
        kept = {1: "yes", 0: "no", None: ""}[r["accepted"]]
        table.add_row(str(r["step"]), _fmt(r["value"]), r["status"], kept, r["description"] or "")
    return table
