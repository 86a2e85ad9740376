"""Session mode: a command-line agent works in sessions and runs experiments with `rloopd submit`.

A `Loop` whose agent is `cmd:...` hands each step after the baseline to `SessionDriver.run_one`, which runs
one session (DESIGN section 5):

1. the prompt is rendered from the lab's template with the run's current program.md, results.tsv, notes
   and the session number, and written to the session's private directory;
2. `session.started` is appended and the agent runs in the session sandbox (cwd: the run directory) with
   `RLOOPD_SOCKET` naming its run's own socket, which takes only `submit` and `result`;
3. each `submit` (one at a time) captures memory, checks integrity (files of the workspace outside the
   editable globs are reverted and recorded as `integrity.violated`), snapshots the workspace, appends
   `experiment.submitted` and runs the experiment as the loop runs any other, then answers with the result;
4. when the agent exits, times out or is ended (window, pause, stop, shutdown: SIGTERM, then SIGKILL after
   the grace period), its notes and artifacts are captured as `memory.written`, unsubmitted changes are
   submitted for it (unless the window closed or the run is stopping), files it changed outside its
   writable paths are put back, and `session.ended` records the reason, exit code and output (a blob,
   redacted like every note and artifact).

Sessions that start no experiment count towards `empty_cap`; between them the driver backs off, so a
broken agent cannot spin. Secrets are redacted from everything written (daemon/redact.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rloopd.agents.cmd import DEFAULT_PROMPT, parse_cmd, render_prompt
from rloopd.lab import matching_files
from rloopd.log import NewEvent, new_id
from rloopd.memory.rundir import CHECKPOINT, frozen_dest, materialize_frozen, write_atomic
from rloopd.redact import Redactor
from rloopd.runner import Interrupted
from rloopd.runs import prompt_template
from rloopd.runsocket import RunSocket, SubmitRefused
from rloopd.sandbox import SessionLimits, give_to, session_sandbox
from rloopd.session import SessionSpec, run_session
from rloopd.snapshots import workspace_files

if TYPE_CHECKING:
    from rloopd.loop import Loop

DAEMON_ONLY = ("RLOOPD_HOME", "RLOOPD_SOCKET", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID")


class SessionDriver:
    def __init__(self, loop: Loop):
        self.loop, self.home, self.run_id = loop, loop.home, loop.run_id
        self.cfg = loop.lab.agent
        self.agent = parse_cmd(loop.created["agent"])
        self.uid = loop.created.get("uid") if os.geteuid() == 0 and loop.created.get("sandbox") != "none" else None
        self.dir = self.home.path / "sessions" / self.run_id
        self.busy = threading.Lock()
        self.session: int | None = None
        self.program_at_start: str | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, threading.Thread] = {}
        self.latest: str | None = None
        self.empty = 0
        self.redactor = Redactor()

    # --- one session -----------------------------------------------------------------------------

    def run_one(self) -> None:
        loop = self.loop
        if self.empty:
            delay = self.cfg.backoff * 2 ** (self.empty - 1)
            if loop.stop.event.wait(delay):
                raise Interrupted("stopped between sessions")
        n = loop.state.sessions + 1
        steps_before = loop.state.step
        env = self.environment(n)
        self.redactor = Redactor(env)
        prompt = self.dir / "prompt.md"
        write_atomic(prompt, self.prompt(n).encode(), 0o444)
        give_to(self.uid, self.dir / "home", self.dir / "tmp", prompt)
        run_dir = loop.run_dir
        argv = self.agent.command(str(prompt), str(run_dir), n)
        program = Path(argv[0]) if "/" in argv[0] else None
        if program is not None and not program.is_absolute():  # a script of the lab's, e.g. ./agent.sh
            program = Path(loop.created["lab"]) / program
        if program is not None and program.is_file():
            argv[0] = str(program.resolve())
        self.program_at_start = loop.state.program_blob
        loop.append(NewEvent("session.started", {"session": n, "agent": self.agent.spec,
                                                 "program_blob": loop.state.program_blob}))
        if (program is None and shutil.which(argv[0], path=env["PATH"]) is None) or \
                (program is not None and not program.is_file()):
            return self.cannot_start(n, f"cannot start {argv[0]!r}: no such program")
        self.session = n
        give_to(self.uid, run_dir / "workspace", run_dir / "memory" / "notes.md", run_dir / "memory" / "artifacts")
        sock = RunSocket(self.dir / "rloopd.sock", {"submit": self.submit, "result": self.result}, uid=self.uid)
        box = session_sandbox(self.uid, home=self.home.path, run_dir=run_dir, session_dir=self.dir,
                              hide=(Path(loop.created["lab"]),),
                              kind=loop.created.get("sandbox", "auto"),
                              limits=SessionLimits(self.cfg.processes, self.cfg.memory_mb, self.cfg.file_mb),
                              expose=(Path(argv[0]),) if program is not None and program.is_file() else ())
        end, reason = threading.Event(), {"why": "stopped"}
        watching = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(end, reason, watching), daemon=True)
        watcher.start()
        try:
            result = run_session(SessionSpec(
                argv, run_dir, env, timeout=self.cfg.session_timeout,
                quiet_timeout=self.cfg.quiet_timeout, grace=self.cfg.grace,
                max_output=int(self.cfg.max_output_mb * (1 << 20)), prefix=tuple(box.prefix),
                waiting=self.busy.locked),
                stop=end, stop_reason=lambda: reason["why"])
        finally:
            watching.set()
            sock.close()
            self.session = None
            with self.busy:  # a submit still running (the agent was ended while it waited) finishes first
                pass
            for thread in list(self.pending.values()):
                thread.join()
        self.capture_memory(n)
        self.check_integrity(None)  # also when the session ends without a submit (window, pause, stop)
        stopping = loop.stop.is_set() or result.reason in ("window", "paused", "stopped", "daemon-restart")
        left = loop.window_left()
        if not stopping and (left is None or left > 0) and self.unsubmitted():
            self.run_submit(n, f"changes left in the workspace at the end of session {n}", new_id()[:12])
        self.restore_run_dir(n)
        output = self.redactor.redact(result.output)
        if result.detail:
            output += f"\n[rloopd: {result.detail}]\n".encode()
        loop.append(NewEvent("session.ended", {"session": n, "exit_code": result.exit_code, "reason": result.reason,
                                               "output_blob": self.home.blobs.put(output)}))
        if loop.stop.is_set():
            raise Interrupted(f"session {n} ended: {result.reason}")
        self.count(empty=loop.state.step == steps_before)

    def cannot_start(self, n: int, why: str) -> None:
        self.loop.append(NewEvent("session.ended", {"session": n, "exit_code": None, "reason": "error",
                                                    "output_blob": self.home.blobs.put_text(why + "\n")}))
        self.count(empty=True)

    def count(self, empty: bool) -> None:
        """Sessions in a row that started no experiment; at `empty_cap` the run ends."""
        self.empty = self.empty + 1 if empty else 0
        if self.empty >= self.cfg.empty_cap:
            self.loop.finish_run("empty-cap")

    def _watch(self, end: threading.Event, reason: dict[str, str], done: threading.Event) -> None:
        """End the live session when the run is stopped or its window closes (not mid-experiment)."""
        while not done.wait(0.1):
            if self.loop.stop.is_set():
                reason["why"] = self.loop.stop.reason
                end.set()
                return
            left = self.loop.window_left()
            if left is not None and left <= 0 and not self.busy.locked():
                reason["why"] = "window"
                end.set()
                return

    def environment(self, n: int) -> dict[str, str]:
        for d in ("home", "tmp"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLOOPD_") and k not in DAEMON_ONLY}
        env.update(self.cfg.env)
        bindir = str(Path(sys.executable).parent)
        env.update(PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", HOME=str(self.dir / "home"),
                   TMPDIR=str(self.dir / "tmp"), RLOOPD_SOCKET=str(self.dir / "rloopd.sock"),
                   RLOOPD_RUN=self.run_id, RLOOPD_SESSION=str(n), IS_SANDBOX="1")
        return env

    def prompt(self, n: int) -> str:
        loop = self.loop
        template = prompt_template(self.home, loop.created)[1] or DEFAULT_PROMPT
        program = self.home.blobs.get_text(loop.state.program_blob) if loop.state.program_blob else ""
        memory = loop.run_dir / "memory"
        results = (memory / "results.tsv").read_text() if (memory / "results.tsv").exists() else ""
        notes = (memory / "notes.md").read_text(errors="replace") if (memory / "notes.md").exists() else ""
        return render_prompt(template, program=program, results=results, notes=notes, session=n,
                             window_left=loop.window_left(), budget=loop.created["budget"])

    # --- submit and result (called on the run socket's threads) ------------------------------------

    def submit(self, args: dict[str, Any]) -> dict[str, Any]:
        message = str(args.get("message", "")).strip()
        if not message:
            raise SubmitRefused("--message: say what changed and why")
        if not self.busy.acquire(blocking=False):
            raise SubmitRefused(f"an experiment is already running for this run (ticket {self.latest}); "
                                f"wait for it with `rloopd result`")
        try:
            self._check_can_submit()
        except BaseException:
            self.busy.release()
            raise
        n, ticket = self.session, new_id()[:12]
        self.latest = ticket
        try:
            prepared = self.prepare(n, message, ticket)
        except BaseException:
            self.busy.release()
            raise
        if args.get("wait", True):
            try:
                return self._run_locked(prepared)
            finally:
                self.busy.release()

        def work() -> None:
            try:
                self._run_locked(prepared)
            except Exception as e:  # noqa: BLE001 - recorded for `rloopd result`
                self.results[ticket] = {"ticket": ticket, "error": str(e)}
            finally:
                self.busy.release()

        thread = threading.Thread(target=work, name=f"submit-{ticket}", daemon=True)
        self.pending[ticket] = thread
        thread.start()
        return {"ticket": ticket, "step": prepared[1], "pending": True}

    def result(self, args: dict[str, Any]) -> dict[str, Any]:
        ticket = args.get("ticket") or self.latest
        if ticket is None:
            raise SubmitRefused("nothing was submitted in this run yet")
        thread = self.pending.get(ticket)
        if thread is not None:
            thread.join()
        if ticket not in self.results:
            raise SubmitRefused(f"no submit with ticket {ticket!r} in this run")
        found = self.results[ticket]
        if "error" in found:
            raise SubmitRefused(f"ticket {ticket}: {found['error']}")
        return found

    def _check_can_submit(self) -> None:
        loop = self.loop
        if self.session is None:
            raise SubmitRefused("no session of this run is live: submit runs inside a session")
        if loop.stop.is_set():
            raise SubmitRefused(f"the run is {loop.stop.reason}: no new experiment starts")
        left = loop.window_left()
        if left is not None and left <= 0:
            raise SubmitRefused("the run's window has closed: no new experiment starts")
        cap = loop.created.get("experiments")
        if cap is not None and loop.state.step + 1 > cap:
            raise SubmitRefused(f"the run's experiment budget ({cap}) is spent")

    def _run_locked(self, prepared: tuple) -> dict[str, Any]:
        try:
            result = self.execute(*prepared)
        except Interrupted as e:
            raise SubmitRefused(f"the experiment was interrupted: {e}") from None
        self.results[prepared[0]] = result
        return result

    def run_submit(self, n: int | None, message: str, ticket: str) -> dict[str, Any]:
        """Run one submitted experiment on the workspace as it is (the busy lock held, or no session live)."""
        return self.execute(*self.prepare(n, message, ticket))

    def prepare(self, n: int | None, message: str, ticket: str) -> tuple:
        """Capture memory, check integrity, snapshot the workspace and record the submit: after this the
        ticket the agent holds names an event in the log."""
        loop = self.loop
        self.capture_memory(n)
        step = loop.state.step + 1
        self.check_integrity(step)
        workspace = loop.run_dir / "workspace"
        text = self.redactor.redact_text(message)
        commit = self.home.snapshots.commit(workspace, run=self.run_id, ref=f"s{step}-a0", message=text,
                                            parent=loop.state.best_commit)
        diff = self.redactor.redact_text(self.home.snapshots.diff(loop.state.best_commit, commit))
        acts = [NewEvent("agent.acted", {"session": n or 0, "kind": "edit", "summary": summary,
                                         "detail_blob": self.home.blobs.put_text(diff)})
                for summary in diff_summaries(diff)]
        acts.append(NewEvent("agent.acted", {"session": n or 0, "kind": "command",
                                             "summary": f"rloopd submit -m {text!r}"}))
        loop.append(*acts, NewEvent("experiment.submitted", {"session": n or 0, "ticket": ticket, "step": step,
                                                             "message": text}))
        return ticket, step, commit, text, diff

    def execute(self, ticket: str, step: int, commit: str, text: str, diff: str) -> dict[str, Any]:
        loop = self.loop
        began = loop.state.position + 1
        try:
            loop.run_in_slot(step, 0, commit, text, None, {}, diff)
        finally:
            give_to(self.uid, loop.run_dir / "workspace")  # a reject restored the best commit as the daemon's user
        s = loop.state
        outcome = {e.type: e.data for e in self.home.log.read(self.run_id, from_n=began,
                                                              types=["experiment.finished", "experiment.decided"])
                   if e.data["step"] == step}
        finished, decided = outcome.get("experiment.finished", {}), outcome.get("experiment.decided", {})
        left = loop.window_left()
        return {"ticket": ticket, "step": step, "status": finished.get("status"), "metric": s.metric,
                "value": (finished.get("metrics") or {}).get(s.metric), "accepted": bool(decided.get("accepted")),
                "reason": decided.get("reason"), "best": s.best, "best_step": s.best_step,
                "window_left": None if left is None else round(left, 1),
                "program_changed": s.program_blob != self.program_at_start}

    # --- what the session left behind ------------------------------------------------------------

    def after_projection(self) -> None:
        """A projection rewrote notes.md (and artifacts) as the daemon's user: give them back to the agent."""
        memory = self.loop.run_dir / "memory"
        give_to(self.uid, memory / "notes.md", memory / "artifacts")

    def unsubmitted(self) -> bool:
        s = self.loop.state
        return not self.home.snapshots.tree_equal(s.best_commit or s.base_commit, self.loop.run_dir / "workspace")

    def capture_memory(self, n: int | None) -> None:
        """notes.md and files under memory/artifacts/ that differ from the log become `memory.written`."""
        memory = self.loop.run_dir / "memory"
        known = dict(self.loop.fold.mem.files)
        found: dict[str, Path] = {}
        notes = memory / "notes.md"
        if notes.is_file() and not notes.is_symlink():
            found["notes.md"] = notes
        artifacts = memory / "artifacts"
        if artifacts.is_dir():
            for path in sorted(artifacts.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    found[path.relative_to(memory).as_posix()] = path
        events = []
        for rel, path in found.items():
            data = self.redactor.redact(path.read_bytes())
            digest = hashlib.sha256(data).hexdigest()
            if known.get(rel) != digest and not (rel == "notes.md" and rel not in known and not data):
                blob = self.home.blobs.put(data)
                events.append(NewEvent("memory.written", {"path": rel, "blob": blob, "session": n}))
                events.append(NewEvent("agent.acted", {"session": n or 0, "kind": "edit", "detail_blob": blob,
                                                       "summary": f"memory/{rel}: {len(data)} bytes"}))
        for rel in sorted(set(known) - set(found)):
            if rel.startswith("artifacts/"):
                events.append(NewEvent("memory.written", {"path": rel, "blob": None, "session": n}))
        if events:
            self.loop.append(*events)

    def check_integrity(self, step: int | None) -> None:
        """Files of the workspace outside the editable globs are put back to the best commit and recorded."""
        loop = self.loop
        workspace = loop.run_dir / "workspace"
        allowed = matching_files(loop.run_dir, loop.lab.editable)  # the globs are relative to a lab root
        best = loop.state.best_commit or loop.state.base_commit
        changed = [rel for rel in workspace_files(workspace) if f"workspace/{rel}" not in allowed]
        outside = [rel for rel in changed if not self._same_as(best, rel, workspace / rel)]
        if not outside:
            return
        for rel in outside:
            (workspace / rel).unlink(missing_ok=True)
            try:
                write_atomic(workspace / rel, self.home.snapshots.read(best, rel))
            except Exception:  # noqa: BLE001 - not in the best commit: removing it is the revert
                pass
        loop.append(NewEvent("integrity.violated", {"step": step, "paths": [f"workspace/{r}" for r in outside],
                                                    "found": "files outside the editable globs changed",
                                                    "reverted": True}))

    def _same_as(self, commit: str, rel: str, path: Path) -> bool:
        try:
            return self.home.snapshots.read(commit, rel) == path.read_bytes()
        except Exception:  # noqa: BLE001 - absent from the commit: a new file
            return False

    def restore_run_dir(self, n: int) -> None:
        """Without bubblewrap an agent can write outside its paths: put frozen/ and program.md back."""
        loop = self.loop
        run_dir = loop.run_dir
        bad = []
        for entry in loop.created.get("manifest", []):
            if entry["role"] != "frozen" or not entry.get("blob"):
                continue
            dest = frozen_dest(run_dir, entry["path"])
            if not dest.is_file() or hashlib.sha256(dest.read_bytes()).hexdigest() != entry["sha256"]:
                bad.append(dest.relative_to(run_dir).as_posix())
        program = run_dir / "program.md"
        if loop.state.program_blob and (not program.is_file() or
                                        hashlib.sha256(program.read_bytes()).hexdigest() != loop.state.program_blob):
            bad.append("program.md")
        checkpoint = run_dir / "memory" / CHECKPOINT
        if loop.fold.mem.checkpoint_blob and checkpoint.is_file() and \
                hashlib.sha256(checkpoint.read_bytes()).hexdigest() != loop.fold.mem.checkpoint_blob:
            bad.append(f"memory/{CHECKPOINT}")
        if not bad:
            return
        for rel in bad:
            target = run_dir / rel
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        materialize_frozen(run_dir, loop.created["manifest"], self.home.blobs)
        loop.written.clear()
        loop.project()
        loop.append(NewEvent("integrity.violated", {"step": None, "paths": bad, "reverted": True,
                                                    "found": f"session {n} changed files it may only read"}))


def diff_summaries(diff: str) -> list[str]:
    """`workspace/train.py: +3 -1` for each file a unified diff touches."""
    out: list[list] = []
    for line in diff.splitlines():
        if line.startswith("diff --git "):
            out.append([line.split(" b/", 1)[-1], 0, 0])
        elif out and line.startswith("+") and not line.startswith("+++"):
            out[-1][1] += 1
        elif out and line.startswith("-") and not line.startswith("---"):
            out[-1][2] += 1
    return [f"workspace/{name}: +{plus} -{minus}" for name, plus, minus in out]
