"""`rloopd serve`: one daemon per home that runs many runs at once on a pool of slots.

The process follows huey's shape: `initialize()` (take the lock, recover, start the scheduler, the
program watcher and the control socket, tell systemd READY), `loop()` (reap finished runs; signal
handlers only set a flag that it checks), `shutdown()` (stop taking work, end in-flight experiments as
`interrupted`, record `daemon.stopped`, tell systemd STOPPING). Every run lives in its own thread with
its own connection to the log; commands reach a run through its `Stop` request or, for a run not in
flight, as an event the daemon appends itself.
"""

from __future__ import annotations

import errno
import os
import signal
import socketserver
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from rloopd import __version__, control
from rloopd.config import DaemonConfig, cap_reached
from rloopd.errors import RloopdError, one_line
from rloopd.history import run_state
from rloopd.home import Home, secure_home
from rloopd.lock import HomeLock
from rloopd.log import Event, NewEvent
from rloopd.loop import Execute, Loop, LoopOptions, Stop
from rloopd.notify import notify, watchdog_interval
from rloopd.slots import SlotPool
from rloopd.transfer import imported_streams
from rloopd.watch import ProgramWatcher

log = structlog.get_logger("rloopd.daemon")


@dataclass
class Worker:
    """One live run: its thread, its stop request, and what `status` shows about it."""

    run: str
    stop: Stop = field(default_factory=Stop)
    thread: threading.Thread | None = None
    loop: Loop | None = None
    started: float = field(default_factory=time.monotonic)
    step: int | None = None


STORAGE_FULL = ("database or disk is full", "No space left on device", "Disk quota exceeded")


def storage_full(e: BaseException | None) -> str | None:
    """One line saying the disk or the database is full, when `e` (or what it was raised from) says so."""
    for _ in range(10):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{e.strerror}: {e.filename}" if e.filename else str(e.strerror)
        text = str(e).replace("\\n", "\n")  # an RloopdError writes its lines as one (errors.one_line)
        if any(marker in text for marker in STORAGE_FULL):
            return next(line for line in text.splitlines() if any(m in line for m in STORAGE_FULL))[:300]
        e = e.__cause__ or e.__context__
    return None


class Daemon:
    def __init__(self, home: Path, pool: SlotPool, config: DaemonConfig | None = None,
                 execute: Execute | None = None):
        self.home_path, self.pool, self.config = Path(home), pool, config or DaemonConfig()
        self.execute = execute  # where experiments run: None here; a Ray cluster's (daemon/ray_executor.py)
        self.lock = HomeLock(self.home_path)
        self.stopping = threading.Event()
        self.workers: dict[str, Worker] = {}
        # runs waiting for space: {run: {why, since, wait, retry_at}}; retried with a doubling wait (2-60 s)
        self.stalled: dict[str, dict[str, Any]] = {}
        self.guard = threading.RLock()
        self.heartbeat = time.time()
        self.last_turn = time.monotonic()
        self.home: Home | None = None
        self.dashboard: Any = None  # rloopd.dashboard.Dashboard, with `http` set

    # --- lifecycle -------------------------------------------------------------------------------

    def open_home(self) -> Home:
        """A connection for one of the daemon's threads: its durability and its size cap (max_db_mb)."""
        return Home.open(self.home_path, synchronous=self.config.synchronous, max_db_mb=self.config.max_db_mb)

    def initialize(self) -> None:
        self.home = self.open_home()
        self.lock.acquire("daemon")
        if self.config.http:  # the live dashboard: bound first, so a taken port fails the start cleanly
            from rloopd.dashboard import Dashboard

            self.dashboard = Dashboard(self, self.config.http).start()
        self.server = self.serve_socket()
        foreign = imported_streams(self.home.log)  # imported runs are records of work done elsewhere
        secure_home(self.home_path)  # the lock and the socket are new; Home.open did the rest
        for c in self.home.log.runs():  # an older home's run directories, finished runs' included
            self.home.secure_run(c.stream, {"sandbox": "none"} if c.stream in foreign else c.data)
        recovered = [c.stream for c in self.home.log.runs()
                     if c.stream not in foreign and run_state(self.home.log, c.stream).status == "running"]
        self.home.log.append_one("home", "daemon.started", {
            "version": __version__, "pid": os.getpid(),
            "recovery": {"runs": recovered, "slots": self.pool.names}})
        for run in recovered:  # before READY: close what a crash left open, put workspaces back
            Loop(self.home, run).recover()
        for run in recovered:
            self.start_worker(run)
        self.scheduler = BackgroundScheduler(daemon=True)
        self.scheduler.add_job(self.close_windows, "interval", seconds=0.25, id="windows", max_instances=1)
        self.scheduler.add_job(self.checkpoint_wal, "interval", seconds=300, id="wal", max_instances=1)
        self.scheduler.add_job(self.beat, "interval", seconds=5, id="heartbeat", max_instances=1)
        interval = watchdog_interval()
        if interval:
            self.scheduler.add_job(self.watchdog, "interval", seconds=interval, id="watchdog")
        self.scheduler.start()
        self.watcher = ProgramWatcher(self.home_path, self.followed, self.stopping, self.open_home)
        self.watcher.start()
        self.beat()
        notify("READY=1")
        log.info("daemon ready", home=str(self.home_path), pid=os.getpid(), slots=self.pool.names,
                 recovered=recovered)

    def watchdog(self) -> None:
        """Ping systemd only while the main loop turns and the control socket's thread is alive."""
        if time.monotonic() - self.last_turn < 10 and self.server_thread.is_alive():
            notify("WATCHDOG=1")

    def loop(self, timeout: float = 0.5) -> None:
        """One turn: forget runs whose thread ended, try again the runs that waited for space; then wait for
        work or a stop signal."""
        self.last_turn = time.monotonic()
        with self.guard:
            for run, w in list(self.workers.items()):
                if w.thread is not None and not w.thread.is_alive() and self.workers.get(run) is w:
                    del self.workers[run]
            due = [run for run, st in self.stalled.items() if time.monotonic() >= st["retry_at"]]
        for run in due:
            if not self.stopping.is_set():
                self.start_worker(run)  # still full: it stalls again, and waits longer
        self.stopping.wait(timeout)

    def stall(self, run: str, why: str) -> None:
        """The run stopped taking work because the disk or the database is full; nothing it acknowledged is
        lost (a failed append or blob write leaves no trace), and it is tried again after a wait."""
        why = cap_reached(self.config, self.home_path, why)  # a cap is raised by a restart, not by waiting
        with self.guard:
            prev = self.stalled.get(run)
            wait = min(60.0, prev["wait"] * 2) if prev else 2.0
            self.stalled[run] = {"why": why, "since": prev["since"] if prev else time.time(), "wait": wait,
                                 "retry_at": time.monotonic() + wait}
        log.error("storage full: the run waits for space", run=run, why=why, retry_in=wait)
        notify(f"STATUS=run {run} waits for space: {why}")

    def shutdown(self, reason: str = "signal") -> None:
        notify("STOPPING=1")
        log.info("daemon stopping", reason=reason)
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        if self.dashboard is not None:
            self.dashboard.stop()
        with self.guard:
            workers = list(self.workers.values())
        for w in workers:
            w.stop.set("shutdown", by="daemon")
        for w in workers:
            if w.thread is not None:
                w.thread.join(timeout=8)
        self.scheduler.shutdown(wait=False)
        try:
            self.home.log.append_one("home", "daemon.stopped", {"reason": reason})
        except Exception as e:  # a full database or disk: the next start recovers as after a crash
            if storage_full(e) is None:
                raise
            log.error("storage full: daemon.stopped not recorded", why=storage_full(e))
        self.home.close()
        control.socket_path(self.home_path).unlink(missing_ok=True)
        self.lock.release()

    def run_forever(self) -> None:
        reason = {"why": "stopped"}

        def on_signal(signum: int, _frame: Any) -> None:
            reason["why"] = signal.Signals(signum).name
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.initialize()
        try:
            while not self.stopping.is_set():
                self.loop()
        finally:
            self.shutdown(reason["why"])

    # --- runs ------------------------------------------------------------------------------------

    def start_worker(self, run: str) -> Worker:
        """The run's live worker, or a new one. A worker that was asked to stop (a pause, say) is waited
        for first, so that a resume right after a pause never finds the old, ending thread."""
        with self.guard:
            old = self.workers.get(run)
        if old is not None and old.thread is not None:
            if not old.stop.is_set() and old.thread.is_alive():
                return old
            old.thread.join(timeout=60)
        with self.guard:
            current = self.workers.get(run)
            if current is not None and current is not old and current.thread.is_alive():
                return current
            w = Worker(run)
            w.thread = threading.Thread(target=self._drive, args=(w,), name=f"run-{run}", daemon=True)
            self.workers[run] = w
            w.thread.start()
            return w

    def _drive(self, w: Worker) -> None:
        try:
            with self.open_home() as home:
                gpus = int(next(home.log.read(w.run, until_n=0)).data.get("config", {}).get("gpus", 1))

                def on_event(e: Event) -> None:
                    if w.run in self.stalled:  # an append went through: there is space again
                        with self.guard:
                            self.stalled.pop(w.run, None)
                        log.info("storage: the run goes on", run=w.run)
                    if e.type == "experiment.started":
                        w.step = e.data["step"]
                    log.info(e.type, run=w.run, n=e.n, step=e.data.get("step"), status=e.data.get("status"))

                w.loop = Loop(home, w.run, LoopOptions(
                    stop=w.stop, on_event=on_event, execute=self.execute,
                    slot=lambda: self.pool.hold(w.run, gpus, w.stop.event)))
                state = w.loop.run()
                with self.guard:  # it ended without a storage error (paused or stopped while it waited, say)
                    self.stalled.pop(w.run, None)
                log.info("run left the daemon", run=w.run, status=state.status)
        except Exception as e:  # a failure inside one run is recorded and the daemon goes on
            why = storage_full(e)
            if why is not None:
                self.stall(w.run, why)
                return
            log.exception("run failed", run=w.run)
            try:
                with self.open_home() as home:
                    home.log.append(w.run, [NewEvent("run.warned", {"about": "error", "message": f"{type(e).__name__}: {e}"}),
                                            NewEvent("run.finished", {"reason": "failed"})])
            except RloopdError:
                log.exception("could not record the failure", run=w.run)

    def followed(self) -> dict[Path, list[str]]:
        """{program file: [live runs following it]} for the watcher."""
        files: dict[Path, list[str]] = {}
        with self.guard:
            live = [w for w in self.workers.values() if w.loop is not None]
        for w in live:
            path = w.loop.state.program_path
            if path:
                files.setdefault(Path(path), []).append(w.run)
        return files

    # --- periodic jobs ---------------------------------------------------------------------------

    def close_windows(self) -> None:
        with self.guard:
            live = [w for w in self.workers.values() if w.loop is not None]
        for w in live:
            left = w.loop.window_left()
            if left is not None and left <= 0:
                w.stop.set("window", by="scheduler")

    def checkpoint_wal(self) -> None:
        with self.open_home() as home:
            home.log.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def beat(self) -> None:
        self.heartbeat = time.time()
        with self.guard:
            n = len(self.workers)
            waiting = len(self.stalled)
        busy = len(self.pool.holders)
        notify(f"STATUS={n} runs, {busy}/{self.pool.size()} slots busy"
               + (f", {waiting} waiting for space" if waiting else ""))

    # --- the control socket ----------------------------------------------------------------------

    def serve_socket(self) -> socketserver.ThreadingUnixStreamServer:
        path = control.socket_path(self.home_path)
        path.unlink(missing_ok=True)
        daemon = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(control.CLIENT_SILENCE)
                try:
                    msg = control.read_message(self.request, within=control.CLIENT_SILENCE)
                except (OSError, ValueError) as e:  # silent, oversized or malformed: answer and hang up
                    try:
                        control.write_message(self.request, {"ok": False, "error": f"bad request: {e}"})
                    except OSError:
                        pass
                    return
                control.write_message(self.request, daemon.answer(msg))

        server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        os.chmod(path, 0o660)  # the daemon's user and the home's group (no process-wide umask games)
        server.daemon_threads = True
        gid = self.home_path.stat().st_gid
        if os.geteuid() == 0 or gid in os.getgroups():
            os.chown(path, -1, gid)
        self.server_thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                              name="control", daemon=True)
        self.server_thread.start()
        return server

    def answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        from rloopd import commands

        op, args, request = msg.get("op"), msg.get("args"), msg.get("request")
        refused = commands.check_request(op, args, request)
        if refused is not None:
            return {"ok": False, "error": one_line(refused), "exit_code": 2}
        handler = commands.HANDLERS[op]
        try:
            with self.open_home() as home:
                return {"ok": True, "result": handler(self, home, args, request)}
        except RloopdError as e:
            return {"ok": False, "error": str(e), "exit_code": e.exit_code}
        except Exception as e:  # a malformed request must get an answer, never a dropped connection
            why = storage_full(e)
            if why is not None:  # nothing was recorded: the caller may try again once there is space
                return {"ok": False, "error": f"{op}: {cap_reached(self.config, self.home_path, why)}"}
            log.warning("malformed request", op=op, error=f"{type(e).__name__}: {e}")
            return {"ok": False, "error": f"malformed {op} request: {type(e).__name__}: {e}"}
