"""Session mode: a command-line agent works in sessions and runs experiments with `rloopd submit`.

A `Loop` whose agent is `cmd:...` hands each step after the baseline to `SessionDriver.run_one`, which runs
one session (DESIGN section 5):

1. the prompt is rendered from the lab's template with the run's current program.md, results.tsv, notes
   and the session number, and written to the session's private directory;
2. `session.started` is appended and the agent runs in the session sandbox (cwd: the run directory) with
   `RLOOPD_SOCKET` naming its run's own socket, which takes only `submit` and `result`;
3. each `submit` (one at a time) captures memory, checks integrity (files of the workspace outside the
   editable globs or regions are reverted and recorded as `integrity.violated`, daemon/integrity.py),
   snapshots the workspace, appends `experiment.submitted` and runs the experiment as the loop runs any
   other, then answers with the result;
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
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rloopd.agents import check_agent
from rloopd.agents.cli import KINDS as CLI_KINDS
from rloopd.agents.cli import parse_cli
from rloopd.agents.cmd import DEFAULT_PROMPT, parse_cmd, render_prompt
from rloopd.agents.streams import Act, StreamParser
from rloopd.categories import classify
from rloopd.fstree import open_dir, remove, walk
from rloopd.inherit import for_agent as memory_for_agent
from rloopd.integrity import WorkspaceGuard
from rloopd.lab import space_for_agent
from rloopd.log import NewEvent, new_id
from rloopd.memory.rundir import carries, write_atomic
from rloopd.redact import Redactor
from rloopd.runner import Interrupted
from rloopd.runs import prompt_template
from rloopd.runsocket import RunSocket, SubmitRefused, submit_message
from rloopd.sandbox import SessionLimits, give_to, kill_uid, session_sandbox
from rloopd.session import SessionResult, SessionSpec, run_session
from rloopd.snapshots import put_file, read_tree

if TYPE_CHECKING:
    from rloopd.loop import Loop

DAEMON_ONLY = ("RLOOPD_HOME", "RLOOPD_SOCKET", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID")


class SessionDriver(WorkspaceGuard):
    def __init__(self, loop: Loop):
        self.loop, self.home, self.run_id = loop, loop.home, loop.run_id
        self.cfg = loop.lab.agent
        spec = loop.created["agent"]
        self.cli = parse_cli(spec, self.cfg) if check_agent(spec) in CLI_KINDS else None
        self.agent = parse_cmd(spec) if self.cli is None else None
        self.parser: StreamParser | None = None
        self.acts: list[Act] = []
        self.acts_lock = threading.Lock()
        self.empty, self.provider_errors = self.trailing_counts()
        self.cli_version: str | None = None
        self.end, self.end_reason = threading.Event(), {"why": "stopped"}
        self.uid = loop.created.get("uid") if os.geteuid() == 0 and loop.created.get("sandbox") != "none" else None
        self.dir = self.home.path / "sessions" / self.run_id
        self.busy = threading.Lock()
        self.session: int | None = None
        self.program_at_start: str | None = None
        self.results: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, threading.Thread] = {}
        self.latest: str | None = None
        self.redactor = Redactor()

    # --- one session -----------------------------------------------------------------------------

    def run_one(self) -> None:
        loop = self.loop
        waits = [self.cfg.backoff * 2 ** (k - 1) for k in (self.empty, self.provider_errors) if k]
        if waits and loop.stop.event.wait(max(waits)):
            raise Interrupted("stopped between sessions")
        if self.over_spend_cap() is not None:
            return loop.finish_run("spend-cap") if loop.state.status == "running" else None
        n = loop.state.sessions + 1
        steps_before = loop.state.step
        env = self.environment(n)
        self.redactor = Redactor(env)
        prompt = self.dir / "prompt.md"
        run_dir = loop.run_dir
        argv, expose, missing = self.command(n, prompt, env)
        give_to(self.uid, self.dir / "home", self.dir / "tmp")
        box = session_sandbox(self.uid, home=self.home.path, run_dir=run_dir, session_dir=self.dir,
                              hide=(Path(loop.created["lab"]),),
                              kind=loop.created.get("sandbox", "auto"),
                              limits=SessionLimits(self.cfg.processes, self.cfg.memory_mb, self.cfg.file_mb),
                              expose=expose)
        self.program_at_start = loop.state.program_blob
        started: dict[str, Any] = {"session": n, "agent": loop.created["agent"],
                                   "program_blob": loop.state.program_blob}
        if self.cli is not None and not missing:
            if self.cli_version is None:  # asked inside the sandbox, as the agent: the binary is the lab's choice
                self.cli_version = self.cli.version([*box.prefix, argv[0]], env, run_dir) or ""
            started["agent_version"] = self.cli_version or None
        loop.append(NewEvent("session.started", started))
        if missing:
            return self.cannot_start(n, missing)
        if not carries(loop.created.get("memory_policy")):
            loop.project()  # none, results-only: the session starts with empty notes and artifacts
        write_atomic(prompt, self.prompt(n).encode(), 0o444)  # rendered from the memory the session is shown
        give_to(self.uid, prompt)
        self.session = n
        self.parser = self.cli.parser() if self.cli is not None else None
        give_to(self.uid, run_dir / "workspace", run_dir / "memory" / "notes.md", run_dir / "memory" / "artifacts")
        sock = RunSocket(self.dir / "rloopd.sock", {"submit": self.submit, "result": self.result}, uid=self.uid)
        self.end, self.end_reason = threading.Event(), {"why": "stopped"}
        watching = threading.Event()
        watcher = threading.Thread(target=self._watch, args=(self.end, self.end_reason, watching), daemon=True)
        watcher.start()
        result = None
        try:
            result = run_session(SessionSpec(
                argv, run_dir, env, timeout=self.cfg.session_timeout,
                quiet_timeout=self.cfg.quiet_timeout, grace=self.cfg.grace,
                max_output=int(self.cfg.max_output_mb * (1 << 20)), prefix=tuple(box.prefix),
                waiting=self.busy.locked, reap=self._reaper(box.kind),
                stdin=prompt if self.cli is not None else None,
                on_line=self._on_line if self.parser is not None else None,
                separate_stderr=self.parser is not None),
                stop=self.end, stop_reason=lambda: self.end_reason["why"])
        finally:
            watching.set()
            sock.close()
            self.session = None
            with self.busy:  # a submit still running (the agent was ended while it waited) finishes first
                pass
            for thread in list(self.pending.values()):
                thread.join()
            if (reap := self._reaper(box.kind)) is not None:
                reap()  # what left the group with setsid; no experiment is in flight now
        reason = self.after_session(n, result)
        if loop.stop.is_set():
            raise Interrupted(f"session {n} ended: {reason}")
        if reason == "spend-cap" or self.over_spend_cap() is not None:
            return loop.finish_run("spend-cap")
        if reason == "provider-error":  # retried after a backoff; not a restart, not an empty session
            self.provider_errors += 1
            if self.provider_errors >= self.cfg.provider_cap:
                loop.finish_run("provider-error")
            return None
        self.provider_errors = 0
        if reason == "window":  # the loop finishes the run for its window, not for an empty session
            return None
        self.count(empty=loop.state.step == steps_before)
        return None

    def after_session(self, n: int, result: SessionResult) -> str:
        """Record what the session did and left, then `session.ended`, which is written whatever happens
        on the way (a pause or stop during the submit made for the agent interrupts that submit, and the
        session must still close, with its output and usage). Returns the reason recorded."""
        loop = self.loop
        parser, self.parser = self.parser, None
        reason, detail = result.reason, result.detail
        if reason == "disk-cap":
            detail = self.end_reason.get("detail", "")
        if parser is not None and reason == "agent-exit":
            if parser.failure:
                reason, detail = parser.failure, parser.failure_detail  # the CLI gave up: say why, not a restart
            elif parser.lines == 0 and result.exit_code:
                reason, detail = "error", f"the CLI printed no event and exited {result.exit_code}"
        try:
            if parser is not None:
                with self.acts_lock:
                    self.acts += parser.finish()
            self.flush_acts(n)
            self.clean(home_too=True)  # the session's HOME and tmp: the CLI's transcripts, its scratch
            self.reset_oversized_workspace()
            self.capture_memory(n)
            self.check_integrity(None)  # also when the session ends without a submit (window, pause, stop)
            stopping = loop.stop.is_set() or reason in ("window", "paused", "stopped", "daemon-restart",
                                                        "spend-cap")
            left = loop.window_left()
            if not stopping and (left is None or left > 0) and self.unsubmitted():
                self.run_submit(n, f"changes left in the workspace at the end of session {n}", new_id()[:12])
            self.restore_run_dir(n)
        finally:
            output = self.redactor.redact(result.output)
            if detail and parser is None:
                output += f"\n[rloopd: {detail}]\n".encode()
            ended: dict[str, Any] = {"session": n, "exit_code": result.exit_code, "reason": reason,
                                     "output_blob": self.home.blobs.put(output)}
            if parser is not None:
                errors = self.redactor.redact(result.errors) + (f"\n[rloopd: {detail}]\n".encode() if detail else b"")
                ended.update(usage=parser.usage, cost_usd=parser.cost_usd,
                             stderr_blob=self.home.blobs.put(errors) if errors else None)
            loop.append(NewEvent("session.ended", ended))
        return reason

    def command(self, n: int, prompt: Path, env: dict[str, str]) -> tuple[list[str], tuple[Path, ...], str]:
        """(argv, paths the sandbox must show, why it cannot start or ""), and the CLI's environment."""
        run_dir = self.loop.run_dir
        if self.cli is not None:
            seconds = self.cfg.session_timeout
            env.update(self.cli.environment(self.dir / "home", session_seconds=seconds))
            left = None if self.cli.max_usd is None else self.cli.max_usd - self.loop.state.spent_usd
            argv = self.cli.command(str(run_dir), session_seconds=seconds, usd_left=left)
            found = self.cli.installed(env["PATH"])
            if found is None:
                return argv, (), (f"cannot start {self.cli.program!r}: not installed on the daemon's PATH (install "
                                  f"the {'@openai/codex' if self.cli.kind == 'codex' else '@anthropic-ai/claude-code'} "
                                  f"npm package, or set [agent] binary)")
            argv[0] = found
            root = next((p for p in Path(found).parents if p.name == "node_modules"), Path(found).parent)
            return argv, (root,), ""
        argv = self.agent.command(str(prompt), str(run_dir), n)
        program = self.recorded_program() or (Path(argv[0]) if "/" in argv[0] else None)
        if program is not None and not program.is_absolute():  # a script of the lab's, e.g. ./agent.sh
            program = Path(self.loop.created["lab"]) / program
        if program is not None and program.is_file():
            argv[0] = str(program.resolve())
            return argv, (Path(argv[0]),), ""
        if program is not None or shutil.which(argv[0], path=env["PATH"]) is None:
            return argv, (), f"cannot start {argv[0]!r}: no such program"
        return argv, (), ""

    def over_spend_cap(self) -> str | None:
        """What the run has spent past its cap, in words, or None."""
        s, cli = self.loop.state, self.cli
        if cli is None:
            return None
        tokens = s.spent_tokens + (self.parser.tokens if self.parser is not None else 0)
        usd = s.spent_usd + ((self.parser.cost_usd or 0.0) if self.parser is not None else 0.0)
        if cli.max_tokens is not None and tokens >= cli.max_tokens:
            return f"{tokens} tokens of {cli.max_tokens}"
        if cli.max_usd is not None and usd >= cli.max_usd:
            return f"${usd:.4f} of ${cli.max_usd:g}"
        return None

    def _on_line(self, line: bytes) -> None:
        """A line of the CLI's stream (on the session's thread): parsed into acts, kept until the next
        submit or the session's end writes them (the log is written by one thread at a time)."""
        acts = self.parser.feed(line)
        with self.acts_lock:
            self.acts += acts
        if self.over_spend_cap() is not None and not self.end.is_set():
            self.end_reason["why"] = "spend-cap"
            self.end.set()

    def flush_acts(self, n: int | None) -> None:
        """Write the acts parsed so far as `agent.acted` events, redacted."""
        with self.acts_lock:
            acts, self.acts = self.acts, []
        if not acts:
            return
        events = []
        for act in acts:
            summary = act.summary.replace(f"{self.loop.run_dir}/", "")  # paths as the run directory has them
            data: dict[str, Any] = {"session": n or 0, "kind": act.kind,
                                    "summary": self.redactor.redact_text(summary)}
            if act.detail:
                data["detail_blob"] = self.home.blobs.put_text(self.redactor.redact_text(act.detail))
            events.append(NewEvent("agent.acted", data))
        self.loop.append(*events)

    def trailing_counts(self) -> tuple[int, int]:
        """(sessions in a row that started no experiment, sessions in a row ended by provider errors), from
        the log: a resumed run or a restarted daemon keeps its caps and back-offs where they were."""
        empty = provider = 0
        submitted = False
        ends: list[tuple[str, bool]] = []
        for e in self.home.log.read(self.run_id, types=["session.started", "experiment.submitted", "session.ended"]):
            if e.type == "session.started":
                submitted = False
            elif e.type == "experiment.submitted":
                submitted = True
            else:
                ends.append((e.data["reason"], submitted))
        for reason, _made in reversed(ends):
            if reason != "provider-error":
                break
            provider += 1
        for reason, made in reversed(ends[:len(ends) - provider]):
            if made or reason in ("paused", "stopped", "daemon-restart", "window"):
                break
            empty += 1
        return empty, provider

    def _reaper(self, kind: str):
        """Ends every process of the run's uid, for a session without bubblewrap (whose pid namespace ends
        them all by itself): processes that left the group with `setsid`. Never while an experiment of the
        run is in flight: its training children run as the same uid."""
        if self.uid is None or kind == "bwrap":
            return None
        return lambda: None if self.busy.locked() else kill_uid(self.uid)

    def recovered(self) -> None:
        """After a crash of the daemon: what a session left running is ended (without bubblewrap nothing
        else ends it) and its HOME and tmp go, as after any session."""
        if (reap := self._reaper(self.loop.created.get("sandbox", "auto"))) is not None:
            reap()
        self.clean(home_too=True)

    def clean(self, home_too: bool) -> None:
        """Remove what the agent left in its temporary directory (each session) and its HOME (when the run
        finishes): it may hold what the agent wrote about its credentials, and is in no projection."""
        top = open_dir(self.dir)
        if top is None:
            return
        try:
            for d in ("tmp", "home") if home_too else ("tmp",):
                remove(top, d)  # by file descriptor: links are not followed
        finally:
            os.close(top)

    def recorded_program(self) -> Path | None:
        """The agent's script as recorded on run.created (`agent_files`), written read-only into the
        session's directory (which the sandbox shows): sessions run the recorded bytes, not the lab's."""
        entry = next(iter(self.loop.created.get("agent_files") or []), None)
        if entry is None:
            return None
        dest = self.dir / "bin" / Path(entry["path"]).name
        data = self.home.blobs.get(entry["blob"])
        if not dest.is_file() or dest.read_bytes() != data:
            write_atomic(dest, data, 0o555)
        return dest

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
        """End the live session when the run is stopped, its window closes (not mid-experiment) or its files
        pass `[agent] disk_mb` (measured every 0.1 s, less often where a walk takes long)."""
        next_look = 0.0
        while not done.wait(0.1):
            if (now := time.monotonic()) >= next_look:
                why = self.over_disk()
                next_look = now + max(0.0, 10 * (time.monotonic() - now))  # a big tree: at most a tenth of a core
                if why is not None:
                    reason.update(why="disk-cap", detail=why)
                    end.set()
                    return
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
        # Ray's variables stay with the daemon: RAY_AUTH_TOKEN would let a session drive the cluster (README)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RLOOPD_", "RAY_")) and k not in DAEMON_ONLY}
        env.update(self.cfg.env)
        bindir = str(Path(sys.executable).parent)
        env.update(PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", HOME=str(self.dir / "home"),
                   TMPDIR=str(self.dir / "tmp"), RLOOPD_SOCKET=str(self.dir / "rloopd.sock"),
                   RLOOPD_RUN=self.run_id, RLOOPD_SESSION=str(n), IS_SANDBOX="1", SHELL="/bin/bash")
        # the CLIs run commands in login shells, whose /etc/profile resets PATH: this HOME's profile puts
        # back the one `rloopd submit` is found on
        profile = f"export PATH={shlex.quote(env['PATH'])}\n"
        write_atomic(self.dir / "home" / ".bash_profile", profile.encode())
        return env

    def prompt(self, n: int) -> str:
        loop = self.loop
        template = prompt_template(self.home, loop.created)[1] or DEFAULT_PROMPT
        program = self.home.blobs.get_text(loop.state.program_blob) if loop.state.program_blob else ""
        memory = loop.run_dir / "memory"
        mode, raw = read_tree(memory, only="results.tsv").get("results.tsv", ("", b""))
        results = raw.decode(errors="replace") if mode != "120000" else ""
        mode, raw = read_tree(memory, only="notes.md").get("notes.md", ("", b""))  # never through a link
        notes = raw.decode(errors="replace") if mode != "120000" else ""
        return render_prompt(template, program=program, results=results, notes=notes, session=n,
                             window_left=loop.window_left(), budget=loop.created["budget"],
                             memory=memory_for_agent(loop.created),
                             space=space_for_agent(loop.created.get("search_space")))

    # --- submit and result (called on the run socket's threads) ------------------------------------

    def submit(self, args: dict[str, Any]) -> dict[str, Any]:
        message = submit_message(args.get("message", ""))
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
        if ticket is not None and not isinstance(ticket, str):
            raise SubmitRefused(f"ticket: must be a string, not {type(ticket).__name__}")
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
        self.flush_acts(n)  # what the agent did before it submitted, in order
        self.capture_memory(n)
        step = loop.state.step + 1
        self.check_workspace_size()
        self.check_integrity(step)
        workspace = loop.run_dir / "workspace"
        text = self.redactor.redact_text(message)
        commit = self.snapshot(workspace, step, text)
        diff = self.redactor.redact_text(self.home.snapshots.diff(loop.state.best_commit, commit))
        acts = [NewEvent("agent.acted", {"session": n or 0, "kind": "edit", "summary": summary,
                                         "detail_blob": self.home.blobs.put_text(diff)})
                for summary in diff_summaries(diff)]
        acts.append(NewEvent("agent.acted", {"session": n or 0, "kind": "command",
                                             "summary": f"rloopd submit -m {text!r}"}))
        loop.append(*acts, NewEvent("experiment.submitted", {"session": n or 0, "ticket": ticket, "step": step,
                                                             "message": text}))
        best = loop.state.best_commit or loop.state.base_commit
        category = classify(self.home.snapshots.files(best), self.home.snapshots.files(commit), text,
                            loop.lab.params, loop.lab.categories)
        return ticket, step, commit, text, diff, category

    def execute(self, ticket: str, step: int, commit: str, text: str, diff: str, category: str) -> dict[str, Any]:
        loop = self.loop
        began = loop.state.position + 1
        try:
            loop.run_in_slot(step, 0, commit, text, category, {}, diff)
        finally:
            give_to(self.uid, loop.run_dir / "workspace")  # a reject restored the best commit as the daemon's user
        s = loop.state
        outcome = {e.type: e.data for e in self.home.log.read(self.run_id, from_n=began,
                                                              types=["experiment.finished", "experiment.decided"])
                   if e.data["step"] == step and not e.data.get("replica")}  # replica 0: the proposal
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
        known = dict(self.loop.fold.mem.visible)  # what the run directory shows (the policy's view)
        # read by file descriptor, links never followed: the agent may still be swapping entries, and a
        # link read as root would copy a file it may not read into its own notes
        self.cap_artifacts(n, memory)
        found = {f"artifacts/{rel}": data for rel, (mode, data) in read_tree(memory / "artifacts").items()
                 if mode != "120000"} if (memory / "artifacts").is_dir() else {}
        notes = self.read_notes(memory)
        if notes is not None and notes[0] != "120000":
            found = {"notes.md": notes[1], **found}
        events = []
        for rel, raw in sorted(found.items()):
            data = self.redactor.redact(raw)
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

    def cap_artifacts(self, n: int | None, memory: Path) -> None:
        """memory/artifacts/ beyond `[agent] artifacts_mb` (largest files first) is removed and recorded: the
        daemon reads what it keeps into memory and the blob store, and one agent must not fill either."""
        artifacts = memory / "artifacts"
        if not artifacts.is_dir() or artifacts.is_symlink():
            return
        sizes = self._artifact_sizes(artifacts)
        total, cap = sum(sizes.values()), int(self.cfg.artifacts_mb * (1 << 20))
        if total <= cap:
            return
        over = []
        for rel, size in sorted(sizes.items(), key=lambda item: -item[1]):
            if total <= cap:
                break
            put_file(memory, f"artifacts/{rel}", None)
            total -= size
            over.append(f"memory/artifacts/{rel}")
        self.loop.append(NewEvent("integrity.violated", {
            "step": None, "paths": over, "reverted": True,
            "found": f"memory/artifacts/ over its cap of {self.cfg.artifacts_mb:g} MB; the largest files were "
                     f"removed"}))

    @staticmethod
    def _artifact_sizes(artifacts: Path) -> dict[str, int]:
        sizes = {}
        for rel_dir, _, others in walk(artifacts):
            for name, st in others:
                sizes[name if rel_dir == "." else f"{rel_dir}/{name}"] = st.st_size
        return sizes

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
