"""One run in the foreground: create it, evaluate the baseline, then built-in proposals, all as events.

Per experiment (DESIGN section 5): propose a change on the workspace, snapshot it as a commit, check the
frozen manifest, run the lab's experiment in the sandbox, append the result, decide with the pure rule,
save the checkpoint of an accepted change before its decision, and on reject restore the best commit.
Projections (the experiments table, the run directory) catch up after every decision. A loop started on
a run that has an attempt started but not finished records it as `interrupted` and starts the same step
and replica again as the next attempt, so a crashed process costs at most the experiment in flight.
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rloopd import runs
from rloopd.agents import random_search
from rloopd.decide import decide
from rloopd.home import Home
from rloopd.lab import set_constants
from rloopd.log import Event, NewEvent
from rloopd.memory.experiments import ExperimentsTable, results_tsv
from rloopd.memory.rundir import MemoryFiles, project_memory
from rloopd.memory.state import RunState, fold
from rloopd.runner import Experiment, Interrupted, Outcome, run_experiment
from rloopd.sandbox import training_sandbox

OnEvent = Callable[[Event], None]


@dataclass
class LoopOptions:
    stop: threading.Event | None = None
    on_event: OnEvent | None = None


class Loop:
    """Drives one run: `run()` until its experiment budget is spent or it is stopped."""

    def __init__(self, home: Home, run: str, opts: LoopOptions | None = None):
        self.home, self.run_id, self.opts = home, run, opts or LoopOptions()
        self.table = ExperimentsTable(home.log)
        self.state = fold(list(home.log.read(run)))
        self.created = self.state.created
        self.lab = runs.run_lab(home, self.state)
        self.run_dir = home.run_dir(run)
        self.mode = random_search.parse_agent(self.created["agent"])

    # --- events ----------------------------------------------------------------------------------

    def append(self, *new: NewEvent) -> list[Event]:
        stored = self.home.log.append(self.run_id, list(new), expected_n=self.state.position + 1)
        self.state = fold(stored, self.state)
        for e in stored:
            if self.opts.on_event:
                self.opts.on_event(e)
        return stored

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> RunState:
        self.recover()
        cap = self.created.get("experiments")
        try:
            while self.state.status == "running":
                if self.opts.stop is not None and self.opts.stop.is_set():
                    raise Interrupted("stopped before the next experiment")
                retry = self.state.retry
                next_step, attempt = (retry.step, retry.attempt) if retry else (self.state.step + 1, 0)
                if cap is not None and next_step > cap:
                    self.append(NewEvent("run.finished", {
                        "reason": "experiment budget spent", "best": self.state.best,
                        "best_step": self.state.best_step, "best_commit": self.state.best_commit}))
                    break
                self.experiment(next_step, attempt)
        except Interrupted as e:
            self.append(NewEvent("run.stopped", {"by": "interrupt", "reason": str(e)}))
        finally:
            self.project()
        return self.state

    def recover(self) -> None:
        """Close an attempt left open by a crash; it is started again as the next attempt of its step."""
        flight = self.state.in_flight
        if flight is not None:
            self.append(NewEvent("experiment.finished", {
                "step": flight.step, "replica": flight.replica, "attempt": flight.attempt,
                "status": "interrupted", "metrics": {}}))
        runs.restore_workspace(self.home, self.state, self.run_dir / "workspace")
        self.project()

    def experiment(self, step: int, attempt: int) -> None:
        workspace = self.run_dir / "workspace"
        runs.restore_workspace(self.home, self.state, workspace)
        if step == 0:
            commit, description, category, params = self.created["base_commit"], "baseline", None, {}
        else:
            train_py = workspace / "train.py"
            proposal = random_search.propose(self.lab.params, train_py.read_text(), self.mode,
                                             self.created["seed"], step, attempt)
            random_search.apply_proposal(train_py, proposal, set_constants)
            description, category, params = proposal.description, proposal.category, proposal.params
            commit = self.home.snapshots.commit(workspace, run=self.run_id, ref=f"s{step}-a{attempt}",
                                                message=description, parent=self.state.best_commit)
        diff = self.home.snapshots.diff(self.state.best_commit if step else None, commit)
        self.append(NewEvent("experiment.started", {
            "step": step, "attempt": attempt, "commit": commit, "description": description,
            "category": category, "params": params, "program_blob": self.state.program_blob,
            "diff_blob": self.home.blobs.put_text(diff)}))
        try:
            outcome = self.execute(commit, step, attempt)
        except Interrupted:
            self.append(NewEvent("experiment.finished", {
                "step": step, "attempt": attempt, "status": "interrupted", "metrics": {}}))
            raise
        self.finish(step, attempt, commit, outcome)

    def execute(self, commit: str, step: int, attempt: int) -> Outcome:
        runs.check_manifest(self.home, self.created)
        scratch = self.home.path / "tmp" / self.run_id / "scratch"
        snapshot = self.home.path / "tmp" / self.run_id / f"ws-{step}-{attempt}"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
        self.home.snapshots.export(commit, snapshot)
        judge = runs.judge_dir(self.home, self.created)
        sandbox = training_sandbox(self.created.get("uid"), hide=[self.home.path, Path(self.created["lab"])],
                                   scratch=scratch, kind=self.created["sandbox"])
        entry = self.lab.entry_command(judge, sys.executable)
        exp = Experiment(command=entry, workspace=snapshot, budget=self.created["budget"],
                         timeout=self.lab.timeout, seed=self.created["seed"] * 1000 + step,
                         secrets=runs.lab_secrets(self.home), sandbox=sandbox.prefix,
                         cache=self.home.path / "cache", scratch=scratch,
                         private=self.home.path / "tmp" / self.run_id / "judge", extra_args=self.lab.entry_args())
        try:
            return run_experiment(exp, self.opts.stop)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def finish(self, step: int, attempt: int, commit: str, outcome: Outcome) -> None:
        metric = self.created["metric"]
        value = outcome.metrics.get(metric)
        self.append(NewEvent("experiment.finished", {
            "step": step, "attempt": attempt, "status": outcome.status, "metrics": outcome.metrics,
            "log_blob": self.home.blobs.put(outcome.log), "wall_seconds": round(outcome.wall_seconds, 3)}))
        d = decide(self.state.best, outcome.status, value, self.created["direction"], self.lab.accept)
        events = []
        if d.accepted and outcome.model is not None:
            events.append(NewEvent("checkpoint.saved", {"step": step, "blob": self.home.blobs.put_file(outcome.model)}))
        events.append(NewEvent("experiment.decided", {
            "step": step, "accepted": d.accepted, "reason": d.reason, "best_before": d.best_before,
            "best_after": d.best_after, "best_commit": commit if d.accepted else self.state.best_commit}))
        self.append(*events)
        if outcome.workdir is not None:
            shutil.rmtree(outcome.workdir, ignore_errors=True)
        if not d.accepted:
            runs.restore_workspace(self.home, self.state, self.run_dir / "workspace")
        self.project()

    def project(self) -> None:
        """Bring the experiments table and the run directory up to the log."""
        self.table.catch_up()
        mem = MemoryFiles()
        for e in self.home.log.read(self.run_id):
            mem.apply(e)
        project_memory(self.run_dir, mem, self.home.blobs,
                       results_tsv(self.table.rows(self.run_id), self.created["metric"]))
