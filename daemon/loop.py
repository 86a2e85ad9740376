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
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from rloopd import runs
from rloopd.agents import SESSION_KINDS, check_agent, random_search
from rloopd.decide import decide
from rloopd.errors import StaleRun
from rloopd.home import Home
from rloopd.lab import set_constants
from rloopd.log import Event, NewEvent
from rloopd.memory.experiments import ExperimentsTable
from rloopd.memory.folded import FoldSnapshots, fold_history
from rloopd.memory.rundir import project_memory
from rloopd.memory.state import RunState, parse_at
from rloopd.runner import Interrupted, Outcome, run_experiment
from rloopd.sessions import SessionDriver

OnEvent = Callable[[Event], None]
SlotFactory = Callable[[], AbstractContextManager[dict[str, str]]]


class Stop:
    """A request to end the loop, with why: `paused`, `stopped`, `window`, or `shutdown` (the daemon is
    going down: the run stays `running` and resumes when a daemon starts again). Safe across threads."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason, self.by, self.request = "stopped", "cli", None
        self._lock = threading.Lock()

    def set(self, reason: str = "stopped", by: str = "cli", request: str | None = None) -> None:
        with self._lock:  # the first request wins, whole: its reason with its request id
            if not self.event.is_set():
                self.reason, self.by, self.request = reason, by, request
                self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


@dataclass
class LoopOptions:
    stop: Stop | None = None
    on_event: OnEvent | None = None
    slot: SlotFactory | None = None  # held only while an experiment runs; yields its environment


class Loop:
    """Drives one run: `run()` until its experiment budget or window is spent, or it is stopped."""

    def __init__(self, home: Home, run: str, opts: LoopOptions | None = None):
        self.home, self.run_id, self.opts = home, run, opts or LoopOptions()
        self.stop = self.opts.stop or Stop()
        self.table = ExperimentsTable(home.log)
        self.snapshots = FoldSnapshots(home.log)
        # The run's whole history folded (a fork's parent prefix too), from the nearest fold snapshot.
        self.fold = fold_history(home.log, run)
        self.written: dict[str, str] = {}
        self.sync()
        self.created = self.state.created
        self.lab = runs.run_lab(home, self.state)
        self.run_dir = home.run_dir(run)
        home.secure_run(run, self.created)  # only the run's own uid gets in (an older home is tightened here)
        self.kind = check_agent(self.created["agent"])
        self.mode = random_search.parse_agent(self.created["agent"]) if self.kind == "random" else None
        self.sessions = SessionDriver(self) if self.kind in SESSION_KINDS else None

    @property
    def state(self) -> RunState:
        return self.fold.state

    # --- events ----------------------------------------------------------------------------------

    def sync(self) -> list[Event]:
        """Fold events other writers appended to this run (a live program edit, a command)."""
        new = list(self.home.log.read(self.run_id, from_n=self.state.position + 1))
        self.fold.add(new)
        return new

    def append(self, *new: NewEvent) -> list[Event]:
        for tries in range(5):  # another writer (the program watcher) may append between sync and append
            self.sync()
            try:
                stored = self.home.log.append(self.run_id, list(new), expected_n=self.state.position + 1)
                break
            except StaleRun:
                if tries == 4:
                    raise
        self.fold.add(stored)
        for e in stored:
            if self.opts.on_event:
                self.opts.on_event(e)
        return stored

    # --- the loop --------------------------------------------------------------------------------

    def window_left(self, now: datetime | None = None) -> float | None:
        """Seconds left in the run's window (active time only: experiments, not pauses or slot waits)."""
        window = self.created.get("window_seconds")
        if window is None:
            return None
        s, now = self.state, now or datetime.now(UTC)
        used = s.active_seconds
        live = s.session_started_at or (s.in_flight is not None and s.flight_started_at)
        if live:  # the session (or the experiment outside one) in progress, less its waits for a slot
            used += (now - parse_at(live)).total_seconds()
        if s.session_started_at:
            used -= s.session_waited + ((now - parse_at(s.waiting_since)).total_seconds() if s.waiting_since else 0)
        return window - used

    def run(self) -> RunState:
        self.recover()
        cap = self.created.get("experiments")
        try:
            while self.state.status == "running":
                if self.stop.is_set():
                    raise Interrupted("stopped before the next experiment")
                retry = self.state.retry  # an interrupted attempt is started again: same step, same change
                next_step, attempt = (retry.step, retry.attempt) if retry else (self.state.step + 1, 0)
                left, budget = self.window_left(), self.expected_seconds()
                if cap is not None and next_step > cap:
                    self.finish_run("experiment budget spent")
                elif left is not None and left < max(budget, 1e-9):
                    self.finish_run("window")
                elif self.sessions is not None and next_step >= 1 and retry is None:
                    self.sessions.run_one()  # the agent's session submits the experiments
                else:
                    self.experiment(next_step, attempt)
        except Interrupted:
            self.interrupted()
        finally:
            self.project()
        return self.state

    def expected_seconds(self) -> float:
        """What the next experiment will likely take: the budget, or the median so far if longer."""
        walls = sorted(r["wall_seconds"] for r in self.fold.rows.values() if r.get("wall_seconds"))
        median = walls[len(walls) // 2] if walls else 0.0
        return max(self.lab.budget_seconds or 0.0, median)

    def finish_run(self, reason: str) -> None:
        self.append(NewEvent("run.finished", {"reason": reason, "best": self.state.best,
                                              "best_step": self.state.best_step, "best_commit": self.state.best_commit}))
        if self.sessions is not None:
            self.sessions.clean(home_too=True)

    def interrupted(self) -> None:
        """Record why the loop ended early; a daemon shutdown records nothing, so the run resumes."""
        reason, by = self.stop.reason, self.stop.by
        rid = {"id": self.stop.request} if self.stop.request else {}
        if reason == "paused":
            self.append(NewEvent("run.paused", {"by": by, "reason": "paused"}, **rid))
        elif reason == "window":
            self.finish_run("window")
        elif reason != "shutdown":
            self.append(NewEvent("run.stopped", {"by": by, "reason": reason}, **rid))
        runs.restore_workspace(self.home, self.state, self.run_dir / "workspace")

    def recover(self) -> None:
        """Close an attempt left open by a crash; it is started again as the next attempt of its step."""
        flight = self.state.in_flight
        if flight is not None:
            self.append(NewEvent("experiment.finished", {
                "step": flight.step, "replica": flight.replica, "attempt": flight.attempt,
                "status": "interrupted", "metrics": {}}))
        if self.state.open_session is not None:
            self.append(NewEvent("session.ended", {"session": self.state.open_session, "reason": "daemon-restart"}))
        runs.restore_workspace(self.home, self.state, self.run_dir / "workspace")
        self.project()

    def experiment(self, step: int, attempt: int) -> None:
        workspace = self.run_dir / "workspace"  # at the best commit: recover() and each reject put it there
        retried = self.retried_attempt(step, attempt)
        if retried is not None:
            commit, description, category, params = (retried["commit"], retried["description"],
                                                     retried.get("category"), retried.get("params", {}))
        elif step == 0:
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
        self.run_in_slot(step, attempt, commit, description, category, params, diff)

    def run_in_slot(self, step: int, attempt: int, commit: str, description: str, category: str | None,
                    params: dict, diff: str) -> None:
        with (self.opts.slot or _no_slot)() as env:
            if self.stop.is_set():
                raise Interrupted("stopped while waiting for a slot")
            self.run_attempt(step, attempt, commit, description, category, params, diff, env)

    def run_attempt(self, step: int, attempt: int, commit: str, description: str, category: str | None,
                    params: dict, diff: str, env: dict[str, str]) -> None:
        self.sync()  # the program version in force is the latest one recorded, also by the watcher
        self.append(NewEvent("experiment.started", {
            "step": step, "attempt": attempt, "commit": commit, "description": description,
            "category": category, "params": params, "program_blob": self.state.program_blob,
            "diff_blob": self.home.blobs.put_text(diff)}))
        try:
            outcome = self.execute(commit, step, attempt, env)
        except Interrupted:
            self.append(NewEvent("experiment.finished", {
                "step": step, "attempt": attempt, "status": "interrupted", "metrics": {}}))
            raise
        self.finish(step, attempt, commit, outcome)

    def retried_attempt(self, step: int, attempt: int) -> dict | None:
        """The experiment.started of the attempt this one starts again, if it is a retry."""
        if attempt == 0:
            return None
        for e in self.home.log.read(self.run_id, types=["experiment.started"]):
            if e.data["step"] == step and e.data.get("attempt", 0) == attempt - 1:
                return e.data
        return None

    def execute(self, commit: str, step: int, attempt: int, env: dict[str, str]) -> Outcome:
        runs.check_manifest(self.home, self.created)
        snapshot = self.home.path / "tmp" / self.run_id / f"ws-{step}-{attempt}"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
        self.home.snapshots.export(commit, snapshot)
        exp = runs.experiment_for(self.home, self.run_id, self.created, self.lab, snapshot, step, env=env)
        try:
            return run_experiment(exp, self.stop.event)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def finish(self, step: int, attempt: int, commit: str, outcome: Outcome) -> None:
        metric = self.created["metric"]
        value = outcome.metrics.get(metric)
        self.append(NewEvent("experiment.finished", {
            "step": step, "attempt": attempt, "status": outcome.status, "metrics": outcome.metrics,
            "log_blob": self.home.blobs.put(self.redact(outcome.log)), "wall_seconds": round(outcome.wall_seconds, 3)}))
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
        if not d.accepted:  # the workspace holds the rejected change: put the best commit back, no probe
            self.home.snapshots.restore(self.state.best_commit or self.state.base_commit, self.run_dir / "workspace")
        self.project()

    def redact(self, data: bytes) -> bytes:
        """What agent code printed (the training log) is redacted like the session's own output."""
        return self.sessions.redactor.redact(data) if self.sessions is not None else data

    def project(self) -> None:
        """Bring the experiments table and the run directory up to the log; every `EVERY` events, store the
        fold as a snapshot, so that a fork or a restart here folds only what came after it."""
        self.sync()
        if self.sessions is not None and self.sessions.session is not None:
            self.sessions.capture_memory(self.sessions.session)  # what the agent wrote, before it is re-projected
        self.table.catch_up()
        project_memory(self.run_dir, self.fold.mem, self.home.blobs, self.fold.results_tsv(self.created["metric"]),
                       self.written)
        self.table.set_position(f"rundir:{self.run_id}", self.state.position)  # what replay compares against
        if self.sessions is not None and self.sessions.session is not None:
            self.sessions.after_projection()
        self.snapshots.save_if_due(self.fold, self.run_id)


@contextmanager
def _no_slot() -> Iterator[dict[str, str]]:
    yield {}
