"""One run in the foreground: create it, evaluate the baseline, then built-in proposals, all as events.

Per experiment (DESIGN section 5): propose a change on the workspace, snapshot it as a commit, check the
frozen manifest, run the lab's experiment in the sandbox, append the result, decide with the pure rule,
save the checkpoint of an accepted change before its decision, and on reject restore the best commit.
Projections (the experiments table, the run directory) catch up after every decision. A loop started on
a run that has an attempt started but not finished records it as `interrupted` and starts the same step
and replica again as the next attempt, so a crashed process costs at most the experiment in flight. An
executor that loses the experiment itself (`opts.execute`: a Ray node that died, daemon/ray_executor.py)
returns it as `interrupted` with `Outcome.lost`, and the loop does the same at once: closed, then started
again (LOST_LIMIT times in a row at most; a stop in between opens no new attempt). Only `lost` re-runs: a
judge cannot ask for one (the runner records a judge's `interrupted` as `crashed`).

Under `accept = "rerun:K"` a candidate whose first run (replica 0) beats the best is run again as replicas
1..K of its step, with other seeds, before its decision (`confirm`); the decision records the mean and each
replica's value. A step that finished but was not decided when the process died (between replicas, or
between its finish and its decision) is decided when the loop starts again, from what the log recorded,
after the replicas it still lacks (`settle`).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from rloopd import runs
from rloopd.agents import SESSION_KINDS, check_agent, optuna_agent, random_search
from rloopd.decide import decide, decide_replicas, rerun_count
from rloopd.errors import StaleRun
from rloopd.home import Home
from rloopd.lab import set_constants
from rloopd.log import Event, NewEvent
from rloopd.memory.experiments import ExperimentsTable
from rloopd.memory.folded import FoldSnapshots, fold_history
from rloopd.memory.rundir import project_memory
from rloopd.memory.state import RunState, parse_at
from rloopd.runner import Experiment, Interrupted, Outcome, run_experiment
from rloopd.sessions import SessionDriver

OnEvent = Callable[[Event], None]
SlotFactory = Callable[[], AbstractContextManager[dict[str, str]]]
Execute = Callable[[Experiment, threading.Event | None], Outcome]  # runs the judge; raises Interrupted on stop
LOST_LIMIT = 10  # attempts of one step in a row an executor may lose (a Ray node dying) before it counts as crashed


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
    execute: Execute | None = None  # where the judge runs: None here (runner.run_experiment); ray_executor.py


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
        self.params = self.lab.params_in_space()  # what a built-in policy may set in the run's search space
        self.run_dir = home.run_dir(run)
        home.secure_run(run, self.created)  # only the run's own uid gets in (an older home is tightened here)
        self.kind = check_agent(self.created["agent"])
        self.mode = random_search.parse_agent(self.created["agent"]) if self.kind == "random" else \
            optuna_agent.parse_agent(self.created["agent"]) if self.kind == "optuna" else None
        self.held: Outcome | None = None  # rerun:K: the replica whose model becomes the checkpoint if kept
        self.proposal: tuple[int, dict] | None = None  # the step's replica 0 as started, for its replicas
        self.settle_due = False
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
                if retry is None and (undecided := self.undecided()) is not None:
                    self.settle(undecided)
                elif cap is not None and next_step > cap:
                    self.finish_run("experiment budget spent")
                elif left is not None and left < max(budget, 1e-9):
                    self.finish_run("window")
                elif self.sessions is not None and next_step >= 1 and retry is None:
                    self.sessions.run_one()  # the agent's session submits the experiments
                else:
                    self.experiment(next_step, attempt, retry.replica if retry else 0)
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
        """The run's end: recorded, and its workspace put at the best commit (an agent's change that a
        closing window left unsubmitted never ran, so the finished run's directory shows what the log says)."""
        runs.restore_workspace(self.home, self.state, self.run_dir / "workspace")  # first: a crash between
        # the two leaves a running run, which its recovery puts back anyway
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
            if self.sessions is not None:  # what the agent wrote before the crash, before a projection drops it
                self.sessions.capture_memory(self.state.open_session)
            self.append(NewEvent("session.ended", {"session": self.state.open_session, "reason": "daemon-restart"}))
        if self.sessions is not None:
            self.sessions.recovered()
        runs.restore_workspace(self.home, self.state, self.run_dir / "workspace")
        self.settle_due = True  # the last step may have finished without its decision
        self.project()

    def experiment(self, step: int, attempt: int, replica: int = 0) -> None:
        workspace = self.run_dir / "workspace"  # at the best commit: recover() and each reject put it there
        retried = self.retried_attempt(step, attempt, replica)
        extra: dict = {}
        if retried is not None:
            commit, description, category, params = (retried["commit"], retried["description"],
                                                     retried.get("category"), retried.get("params", {}))
            extra = {k: retried[k] for k in ("suggested_by", "study") if retried.get(k) is not None}
        elif step == 0:
            commit, description, category, params = self.created["base_commit"], "baseline", None, {}
        else:
            if self.kind == "optuna":  # the study is rebuilt from the log each step (agents/optuna_agent.py)
                s = optuna_agent.propose(self.mode, self.params, self.run_dir, self.fold.rows.values(),
                                         self.home.snapshots, self.created, step, attempt)
                optuna_agent.apply(self.run_dir, self.params, s.params)
                description, category, params = s.description, s.category, s.params
                extra = {"suggested_by": s.suggested_by, "study": s.study}
            else:
                train_py = workspace / "train.py"
                proposal = random_search.propose(self.params, train_py.read_text(), self.mode,
                                                 self.created["seed"], step, attempt)
                random_search.apply_proposal(train_py, proposal, set_constants)
                description, category, params = proposal.description, proposal.category, proposal.params
            commit = self.home.snapshots.commit(workspace, run=self.run_id, ref=f"s{step}-a{attempt}",
                                                message=description, parent=self.state.best_commit)
        diff = self.home.snapshots.diff(self.state.best_commit if step else None, commit)
        self.run_in_slot(step, attempt, commit, description, category, params, diff, replica=replica, extra=extra)

    def run_in_slot(self, step: int, attempt: int, commit: str, description: str, category: str | None,
                    params: dict, diff: str, *, replica: int = 0, extra: dict | None = None) -> None:
        try:
            with (self.opts.slot or _no_slot)() as env:
                if self.stop.is_set():
                    raise Interrupted("stopped while waiting for a slot")
                self.run_attempt(step, attempt, commit, description, category, params, diff, env,
                                 replica=replica, extra=extra)
        finally:
            self.release()

    def run_attempt(self, step: int, attempt: int, commit: str, description: str, category: str | None,
                    params: dict, diff: str, env: dict[str, str], *, replica: int = 0,
                    extra: dict | None = None, lost: int = 0) -> None:
        self.sync()  # the program version in force is the latest one recorded, also by the watcher
        if replica == 0:
            self.proposal = (step, {"description": description, "category": category, "params": params,
                                    "diff": diff, "extra": dict(extra or {})})
        warm = self.warm_start_blob() if step > 0 else None  # the baseline is the lab's code, trained cold
        self.append(NewEvent("experiment.started", {
            "step": step, "replica": replica, "attempt": attempt, "commit": commit, "description": description,
            "category": category, "params": params, "program_blob": self.state.program_blob,
            "diff_blob": self.home.blobs.put_text(diff), **({"warm_start_blob": warm} if warm else {}),
            **(extra or {})}))
        try:
            outcome = self.execute(commit, step, attempt, env, replica, warm)
        except Exception:  # Interrupted, or the daemon's own failure: the attempt is closed, and retried
            self.append(NewEvent("experiment.finished", {
                "step": step, "replica": replica, "attempt": attempt, "status": "interrupted", "metrics": {}}))
            raise
        if outcome.lost and lost + 1 < LOST_LIMIT:
            # The executor lost it (a Ray node or worker died; never what a judge reports: runner.py): closed
            # as interrupted and started again at once as the next attempt, as a restarted daemon would, but
            # without a restart; a stop that came meanwhile opens no new attempt (the run's retry resumes it).
            self.append(NewEvent("experiment.finished", {
                "step": step, "replica": replica, "attempt": attempt, "status": "interrupted", "metrics": {},
                "log_blob": self.home.blobs.put(self.redact(outcome.log)), "wall_seconds": round(outcome.wall_seconds, 3),
                **({"reason": self.redact(outcome.reason.encode()).decode(errors="replace")[:500]}
                   if outcome.reason else {})}))
            if outcome.workdir is not None:
                shutil.rmtree(outcome.workdir, ignore_errors=True)
            if self.stop.is_set():
                raise Interrupted("stopped after a lost experiment")
            return self.run_attempt(step, attempt + 1, commit, description, category, params, diff, env,
                                    replica=replica, extra=extra, lost=lost + 1)
        if outcome.lost:  # lost every time: counted, so that the run moves on
            outcome.status, outcome.reason = "crashed", f"lost {LOST_LIMIT} times in a row; last: {outcome.reason or 'no reason'}"
        elif outcome.status == "interrupted":  # an executor that says interrupted without losing it: not re-run
            outcome.status, outcome.reason = "crashed", outcome.reason or "the executor reported `interrupted`"
        self.finish(step, attempt, commit, outcome, replica=replica, env=env)

    def started_data(self, step: int, replica: int, attempt: int | None = None) -> dict | None:
        """The (last) experiment.started of a step's replica, of one attempt or of any."""
        found = None
        for e in self.home.log.read(self.run_id, types=["experiment.started"]):
            d = e.data
            if d["step"] == step and d.get("replica", 0) == replica and attempt in (None, d.get("attempt", 0)):
                found = d
        return found

    def retried_attempt(self, step: int, attempt: int, replica: int = 0) -> dict | None:
        """The experiment.started of the attempt this one starts again, if it is a retry."""
        if attempt == 0:
            return None
        return self.started_data(step, replica, attempt - 1)

    def warm_start_blob(self) -> str | None:
        """The checkpoint offered to train(ctx): the run's best, where the lab takes one (`warm_start = true`)
        and the memory policy shows it (memory/rundir.py `policy_kind`); a collected one is not offered."""
        blob = self.fold.mem.shown_checkpoint
        return blob if self.lab.warm_start and blob and self.home.blobs.exists(blob) else None

    def execute(self, commit: str, step: int, attempt: int, env: dict[str, str], replica: int = 0,
                warm: str | None = None) -> Outcome:
        runs.check_manifest(self.home, self.created)
        snapshot = self.home.path / "tmp" / self.run_id / f"ws-{step}-{replica}-{attempt}"
        shutil.rmtree(snapshot, ignore_errors=True)
        snapshot.mkdir(parents=True)
        self.home.snapshots.export(commit, snapshot)
        exp = runs.experiment_for(self.home, self.run_id, self.created, self.lab, snapshot, step, env=env,
                                  replica=replica, warm_start=warm)
        try:
            return (self.opts.execute or run_experiment)(exp, self.stop.event)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def finish(self, step: int, attempt: int, commit: str, outcome: Outcome, *, replica: int = 0,
               env: dict[str, str] | None = None) -> None:
        self.append(NewEvent("experiment.finished", {
            "step": step, "replica": replica, "attempt": attempt, "status": outcome.status, "metrics": outcome.metrics,
            "log_blob": self.home.blobs.put(self.redact(outcome.log)), "wall_seconds": round(outcome.wall_seconds, 3),
            **({"warm_started": outcome.warm_started} if outcome.warm_started is not None else {}),
            **({"reason": self.redact(outcome.reason.encode()).decode(errors="replace")[:500]} if outcome.reason else {})}))
        self.confirm(step, commit, outcome, env)

    # --- decisions, and replicas under rerun:K -----------------------------------------------------

    def step_rows(self, step: int) -> dict[int, dict]:
        """replica -> experiment row of `step` (the run's own rows over a fork's parent's)."""
        found: dict[int, dict] = {}
        for (stream, s, replica), row in self.fold.rows.items():
            if s == step and (replica not in found or stream == self.run_id):
                found[replica] = row
        return found

    def confirm(self, step: int, commit: str, outcome: Outcome | None, env: dict[str, str] | None) -> None:
        """Decide `step` from its recorded results; under `rerun:K` a candidate that beats the best first runs
        the replicas 1..K it lacks (each one's finish comes back here), then the mean decides. `env` is the
        slot's when in one (None: settling after a restart, a replica takes a slot of its own)."""
        if outcome is not None and outcome.workdir is not None:
            if self.held is None and outcome.model is not None:
                self.held = outcome  # the first replica's model (replica 0's, but after a restart) is kept
            else:
                shutil.rmtree(outcome.workdir, ignore_errors=True)
        k = rerun_count(self.lab.accept)
        done = {r: (row["status"], row["value"]) for r, row in self.step_rows(step).items()
                if row["status"] not in ("running", "interrupted")}
        best, direction = self.state.best, self.created["direction"]
        d = decide(best, *done[0], direction, self.lab.accept)
        if k and d.accepted:
            missing = [r for r in range(1, k + 1) if r not in done]
            if missing:
                p = self.proposal[1] if self.proposal and self.proposal[0] == step else self.recorded_proposal(step)
                args = (step, 0, commit, p["description"], p["category"], p["params"], p["diff"])
                if env is None:
                    return self.run_in_slot(*args, replica=missing[0], extra=p["extra"])
                return self.run_attempt(*args, env, replica=missing[0], extra=p["extra"])
            d = decide_replicas(best, [done[r] for r in range(k + 1)], direction)
        events = []
        if d.accepted and self.held is not None and self.held.model is not None:
            events.append(NewEvent("checkpoint.saved", {"step": step, "blob": self.home.blobs.put_file(self.held.model)}))
        events.append(NewEvent("experiment.decided", {
            "step": step, "accepted": d.accepted, "reason": d.reason, "best_before": d.best_before,
            "best_after": d.best_after, "best_commit": commit if d.accepted else self.state.best_commit,
            **({"mean": d.mean, "replicas": list(d.replicas)} if d.replicas else {})}))
        self.append(*events)
        self.release()
        if not d.accepted:  # the workspace holds the rejected change: put the best commit back, no probe
            self.home.snapshots.restore(self.state.best_commit or self.state.base_commit, self.run_dir / "workspace")
        self.project()

    def recorded_proposal(self, step: int) -> dict:
        """Replica 0 of `step` as its experiment.started recorded it (after a restart)."""
        d = self.started_data(step, 0) or {}
        return {"description": d.get("description", ""), "category": d.get("category"), "params": d.get("params", {}),
                "diff": self.home.blobs.get_text(d["diff_blob"]) if d.get("diff_blob") else "",
                "extra": {k: d[k] for k in ("suggested_by", "study") if d.get(k) is not None}}

    def release(self) -> None:
        """Drop the model kept for a decision (made, or abandoned by an interruption)."""
        if self.held is not None:
            if self.held.workdir is not None:
                shutil.rmtree(self.held.workdir, ignore_errors=True)
            self.held = None

    def undecided(self) -> int | None:
        """Once after recover(): the last step, if it finished but has no decision (the process died between
        its finish and its decision, or between its replicas)."""
        if not self.settle_due:
            return None
        self.settle_due = False
        first = self.step_rows(self.state.step).get(0)
        if first is None or first["status"] in ("running", "interrupted") or first["accepted"] is not None:
            return None
        return self.state.step

    def settle(self, step: int) -> None:
        """Decide a step the log has results for but no decision (see undecided): the replicas it lacks are
        run first, the decision comes from the recorded values, and no checkpoint is saved for it (its model
        died with the process), unless a replica run now provides one."""
        self.confirm(step, self.step_rows(step)[0]["commit"], None, None)
        runs.restore_workspace(self.home, self.state, self.run_dir / "workspace")

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
