"""The live dashboard: a page and its JSON, served from a thread of the daemon to whoever holds the token.

Why these choices:
- The stdlib `ThreadingHTTPServer`: a loopback admin page that a few browser tabs poll needs no framework,
  and the daemon stays free of an async stack. Every request has its own thread and its own connection to
  the log (`Daemon.open_home`), as the control socket's requests do. A connection gets its thread only
  once its request line and headers have arrived: until then one intake thread waits for it, with up to
  MAX_WAITING others (over that, the oldest is closed); a request must arrive whole (line, headers, body)
  within READ_SECONDS of its connection, or it is closed unanswered; and at most MAX_CONNECTIONS requests
  are served at once (one over the cap is closed at once, without a thread). So idle or slow clients cost
  a socket for seconds, never a thread for ever, and the page's own requests still get through.
- A token always, checked in constant time on every request (`Authorization: Bearer TOKEN`, or `?token=`
  for the page itself): loopback is no boundary on a machine where agent sessions run with network. It
  lives in `<home>/http.token` (0600, made at the first serve, kept across restarts; delete it and restart
  to change it), and every sandbox hides the home. `rloopd dashboard` asks the daemon over the control
  socket for the link: whoever may use that socket may pause, stop and fork anyway.
- Reads reuse the CLI's (status rows, `step_detail`, batch info, the run's fold); the buttons send the
  control socket's ops through `Daemon.answer`, so the log records them exactly as from the CLI, and a
  refused one (a fork from a step that does not exist) is a 409 with the daemon's one-line reason; an
  unknown run is a 404, for a button as for a read.
- Polling, not server-sent events: a detail request that names the run's last event position (`?n=`) is
  answered `unchanged` without folding anything, and no thread is held open per tab.
- The page is one HTML file (no build step) with a per-response CSP nonce: agents write the notes, diffs
  and descriptions it shows, so it only ever sets them as text, and the CSP refuses any script they smuggle.
"""

from __future__ import annotations

import hmac
import io
import json
import os
import queue
import re
import secrets
import selectors
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import structlog

from rloopd import __version__, commands, views
from rloopd.batch import batch_info, batch_runs
from rloopd.config import listen_address
from rloopd.errors import ConfigError, RloopdError, StepNotFound, StreamNotFound
from rloopd.history import ranges
from rloopd.home import Home
from rloopd.log import new_id
from rloopd.memory.folded import fold_history

if TYPE_CHECKING:
    from rloopd.service import Daemon

log = structlog.get_logger("rloopd.dashboard")

TOKEN_FILE = "http.token"
MAX_BODY = 64 * 1024  # bytes of a POST body
MAX_TEXT = 256 * 1024  # characters of notes or a program version sent to the page
MAX_CONNECTIONS = 32  # requests served at once (a thread each); over it, closed at once
MAX_WAITING = 256  # connections whose request line and headers are still arriving; over it, the oldest is closed
MAX_HEAD = 64 * 1024  # bytes of request line and headers the intake collects before it hands them on anyway
READ_SECONDS = 15.0  # a request's line, headers and body must all arrive within this, from its connection
ACTIONS = {"pause", "resume", "stop", "fork"}
FORK_ARGS = {"step", "name", "agent", "experiments"}  # what the page's fork form may send
ROUTES = [
    ("GET", re.compile(r"/"), "page"),
    ("GET", re.compile(r"/api/overview"), "overview"),
    ("GET", re.compile(r"/api/runs/(?P<run>[^/]+)"), "run"),
    ("GET", re.compile(r"/api/runs/(?P<run>[^/]+)/steps/(?P<step>[0-9]{1,9})"), "step"),
    ("POST", re.compile(r"/api/runs/(?P<run>[^/]+)/(?P<action>pause|resume|stop|fork)"), "action"),
]


def home_token(home: Path) -> str:
    """The home's dashboard token, made at the first serve: written whole (a temporary file renamed over),
    mode 0600, so that a crash never leaves an empty or a readable one."""
    path = Path(home) / TOKEN_FILE
    try:
        text = path.read_text().strip()
        if len(text) >= 32:
            os.chmod(path, 0o600)  # tightened if someone loosened it
            return text
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token


class Dashboard:
    """The HTTP server of one daemon: `start()` in `Daemon.initialize`, `stop()` in its shutdown."""

    def __init__(self, daemon: Daemon, listen: str):
        host, port = listen_address(listen)
        self.daemon, self.token = daemon, home_token(daemon.home_path)
        try:
            self.server = (_Server6 if ":" in host else _Server)((host, port), Handler)
        except OSError as e:  # a port taken, an address not on this machine: the start fails in one line
            raise ConfigError(f"http {listen}: cannot listen there: {e.strerror or e}") from None
        self.server.dashboard = self
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                       name="dashboard", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def link(self) -> dict[str, Any]:
        """What `rloopd dashboard` prints: the page's address with its token."""
        return {"url": self.url, "link": f"{self.url}?token={self.token}",
                "token_file": str(self.daemon.home_path / TOKEN_FILE)}

    def start(self) -> Dashboard:
        self.thread.start()
        log.info("dashboard ready", url=self.url, token_file=str(self.daemon.home_path / TOKEN_FILE))
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def authorized(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    # --- what the page reads -------------------------------------------------------------------

    def overview(self, h: Home) -> dict[str, Any]:
        """Every run as `rloopd status --json` lists it (with the daemon's live view), and every batch."""
        live = self.command("status", {})
        rows = views.status_rows(h)
        for row in rows:
            row["live"] = (live.get("result") or {}).get("runs", {}).get(row["run_id"])
            row.pop("search_space", None)
        batches = []
        for stream in h.log.streams():
            if stream.startswith("batch:"):
                batch = stream.removeprefix("batch:")
                batches.append({**batch_info(h, batch), "runs": batch_runs(h, batch)})
        status = live.get("result") or {}
        return {"version": __version__, "home": str(self.daemon.home_path), "pid": status.get("pid"),
                "slots": status.get("slots", []), "busy": status.get("busy", {}), "runs": rows,
                "batches": batches}

    def run(self, h: Home, ref: str, known_n: str | None) -> dict[str, Any]:
        """One run: its state, best-so-far curve, experiments, notes and program history, folded from its
        history (a fork's includes its parent's prefix); `unchanged` when its last event is `known_n`."""
        run = _run_id(h, ref)
        n = h.log.head(run)[0]
        if known_n is not None and known_n == str(n):
            return {"run_id": run, "n": n, "unchanged": True}
        folded = fold_history(h.log, run)
        state = folded.state
        rows = sorted((r for r in folded.rows.values() if r["replica"] == 0), key=lambda r: r["step"])
        experiments = [{k: r[k] for k in ("run", "step", "attempt", "status", "value", "accepted", "best_after",
                                          "description", "category", "wall_seconds")} for r in rows]
        notes = folded.mem.files.get("notes.md")
        parent = state.created.get("parent")
        return {"run_id": run, "n": n, "name": state.name, "status": state.status, "agent": state.created.get("agent"),
                "metric": state.metric, "direction": state.direction, "step": state.step, "best": state.best,
                "best_step": state.best_step, "experiments_done": state.experiments, "accepted": state.accepted,
                "valid": state.valid, "cap": state.created.get("experiments"), "sessions": state.sessions,
                "parent": None if not parent else {"run": parent["run"], "step": parent["step"]},
                "experiments": experiments, "notes": _text(h, notes) if notes else None,
                "memory_files": sorted(folded.mem.files), "programs": self.programs(h, run)}

    def programs(self, h: Home, run: str) -> list[dict[str, Any]]:
        """Every program.md version the run followed, from its root run's creation on."""
        versions = []
        for stream, until in ranges(h.log, run):
            for e in h.log.read(stream, types=["run.created", "program.changed"], until_n=until):
                blob = e.data.get("program_blob")
                if blob is None or (e.type == "run.created" and versions and e.data.get("parent")):
                    continue  # a fork's creation repeats the program in force: not a new version
                versions.append({"run": stream, "n": e.n, "at": e.at, "blob": blob, "text": _text(h, blob),
                                 "source": "created" if e.type == "run.created" else e.data.get("source"),
                                 "path": e.data.get("path")})
        return versions

    # --- what the buttons do -------------------------------------------------------------------

    def command(self, op: str, args: dict[str, Any], request: str | None = None) -> dict[str, Any]:
        """A control op, answered by the very code that answers the CLI over the control socket."""
        return self.daemon.answer({"op": op, "args": args, "request": request or new_id()})


def _run_id(h: Home, ref: str) -> str:
    """The run `ref` names; StreamNotFound (a 404) for no run, an ambiguous prefix, the home or a batch."""
    run = h.log.resolve(ref)
    if run == "home" or run.startswith("batch:"):
        raise StreamNotFound(f"{ref!r} is not a run")
    return run


def _text(h: Home, blob: str) -> str:
    try:
        text = h.blobs.get(blob).decode("utf-8", errors="replace")
    except RloopdError as e:
        return f"({e})"
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f"\n… ({len(text) - MAX_TEXT} more characters)"


class _Server(ThreadingHTTPServer):
    """Accepts in the serving thread, waits for each request's head in one intake thread (selectors), then
    serves it in a thread of its own, MAX_CONNECTIONS at most (see the module docstring)."""

    daemon_threads = True
    block_on_close = False  # the daemon's stop never waits for a browser's idle connection
    allow_reuse_address = True
    request_queue_size = 64
    dashboard: Dashboard

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.arrived: queue.SimpleQueue = queue.SimpleQueue()  # (socket, address, deadline) for the intake
        self.heads: dict[socket.socket, tuple[bytes, float]] = {}  # what the intake read, for the handler
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        self.closing = False
        self.intake_thread = threading.Thread(target=self.intake, name="dashboard-intake", daemon=True)
        self.intake_thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Just accepted: to the intake, no thread yet."""
        self.arrived.put((request, client_address, time.monotonic() + READ_SECONDS))
        self.wake()

    def wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except OSError:  # full (it is woken anyway) or closed
            pass

    def intake(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.wake_r, selectors.EVENT_READ)
        waiting: dict[socket.socket, tuple[bytearray, float, Any]] = {}  # oldest first
        try:
            while not self.closing:
                try:
                    self.intake_once(sel, waiting)
                except Exception:  # a bug here must not end the dashboard: said, and the intake goes on
                    log.exception("dashboard intake failed")
                    time.sleep(0.25)
        finally:
            for sock in list(waiting):
                self.drop(sel, waiting, sock)
            while not self.arrived.empty():
                self.shutdown_request(self.arrived.get_nowait()[0])
            sel.close()
            self.wake_r.close()
            self.wake_w.close()

    def intake_once(self, sel: selectors.BaseSelector, waiting: dict) -> None:
        """One turn of the intake: read what arrived, take the new connections, close the late ones."""
        for key, _ in sel.select(timeout=0.25):
            sock = key.fileobj
            if sock is self.wake_r:
                try:
                    self.wake_r.recv(4096)
                except OSError:
                    pass
            elif sock in waiting:
                self.read_head(sel, waiting, sock)
        while True:
            try:
                sock, address, deadline = self.arrived.get_nowait()
            except queue.Empty:
                break
            try:
                sock.setblocking(False)
                sel.register(sock, selectors.EVENT_READ)
            except (OSError, ValueError):
                self.shutdown_request(sock)
                continue
            waiting[sock] = (bytearray(), deadline, address)
            while len(waiting) > MAX_WAITING:
                self.drop(sel, waiting, next(iter(waiting)))
        now = time.monotonic()
        for sock in [sock for sock, (_, deadline, _) in waiting.items() if deadline <= now]:
            self.drop(sel, waiting, sock)

    def read_head(self, sel: selectors.BaseSelector, waiting: dict, sock: socket.socket) -> None:
        head, deadline, address = waiting[sock]
        try:
            data = sock.recv(8192)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client went away
            self.drop(sel, waiting, sock)
            return
        head += data
        if b"\n\r\n" in head or b"\n\n" in head or len(head) >= MAX_HEAD:  # whole (or too long: the handler says so)
            sel.unregister(sock)
            del waiting[sock]
            self.dispatch(sock, bytes(head), deadline, address)

    def drop(self, sel: selectors.BaseSelector, waiting: dict, sock: socket.socket) -> None:
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        waiting.pop(sock, None)
        self.shutdown_request(sock)

    def dispatch(self, sock: socket.socket, head: bytes, deadline: float, address: Any) -> None:
        """A thread for a request whose head arrived, under the cap; over it, closed at once."""
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(sock)
            return
        self.heads[sock] = (head, deadline)
        try:
            threading.Thread(target=self.process_request_thread, args=(sock, address), name="dashboard-request",
                             daemon=True).start()
        except RuntimeError:  # no thread to be had: this request goes unanswered, the intake goes on
            self.heads.pop(sock, None)
            self.slots.release()
            self.shutdown_request(sock)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.heads.pop(request, None)
            self.slots.release()

    def server_close(self) -> None:
        self.closing = True
        self.wake()
        super().server_close()


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Deadline(io.RawIOBase):
    """The connection's reading side: first what the intake read, then the socket, failing with TimeoutError
    at `until` (a socket timeout bounds one read only: a client sending a byte every few seconds passes it)."""

    def __init__(self, sock: socket.socket, head: bytes, until: float, then: float):
        super().__init__()
        self.sock, self.head, self.until, self.then = sock, memoryview(head), until, then

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        left = self.until - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete request within {READ_SECONDS:g} s")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.then)  # the reply's writes keep the handler's own timeout


class Handler(BaseHTTPRequestHandler):
    """One request: the token first, then one route; every failure is an answer, never a dead thread."""

    server: _Server
    server_version = "rloopd"
    sys_version = ""
    timeout = 15  # seconds one read or write may wait (the whole request: READ_SECONDS)

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own reader: left open, it would keep the socket open after close()
        head, until = self.server.heads.get(self.connection, (b"", time.monotonic() + READ_SECONDS))
        self.rfile = io.BufferedReader(_Deadline(self.connection, head, until, self.timeout))

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        self.serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.serve("POST")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the query holds the token: not logged
        pass

    def serve(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        board = self.server.dashboard
        auth = self.headers.get("Authorization", "")
        given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else query.get("token", [None])[0]
        if not board.authorized(given):
            self.reply(HTTPStatus.UNAUTHORIZED, b"401 Unauthorized: `rloopd dashboard` prints the link with the token\n",
                       "text/plain; charset=utf-8", {"WWW-Authenticate": 'Bearer realm="rloopd"'})
            return
        found = [(name, m) for verb, pattern, name in ROUTES if verb == method and (m := pattern.fullmatch(url.path))]
        if not found:
            self.json(HTTPStatus.NOT_FOUND, {"error": f"no {method} {url.path} here"})
            return
        [(name, match)] = found
        try:
            if name == "page":
                self.page()
            elif name == "action":
                self.action(match["run"], match["action"])
            else:
                with board.daemon.open_home() as h:
                    if name == "overview":
                        body = board.overview(h)
                    elif name == "run":
                        body = board.run(h, match["run"], query.get("n", [None])[0])
                    else:
                        body = views.step_detail(h, h.log.resolve(match["run"]), int(match["step"]))
                self.json(HTTPStatus.OK, body)
        except (StreamNotFound, StepNotFound) as e:
            self.json(HTTPStatus.NOT_FOUND, {"error": str(e)})
        except RloopdError as e:
            self.json(HTTPStatus.CONFLICT, {"error": str(e)})
        except Exception as e:  # a bug or a damaged event: said, logged, and the server goes on
            log.exception("dashboard request failed", path=url.path)
            self.json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})

    def action(self, run: str, action: str) -> None:
        """pause, resume, stop or fork through the control op of the same name; 4xx with its reason."""
        given = self.headers.get("Content-Length") or "0"
        length = int(given) if given.isdigit() else -1
        if not 0 <= length <= MAX_BODY:
            self.json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"a request body is 0 to {MAX_BODY} bytes, with its Content-Length"})
            return
        try:
            raw = self.rfile.read(length)
        except TimeoutError:  # not whole within READ_SECONDS: hung up on, as for a late request line
            self.close_connection = True
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            self.json(HTTPStatus.BAD_REQUEST, {"error": f"the body is not JSON: {e}"})
            return
        if not isinstance(body, dict):
            self.json(HTTPStatus.BAD_REQUEST, {"error": "the body must be a JSON object"})
            return
        args: dict[str, Any] = {"run": run}
        if action == "fork":
            extra = set(body) - FORK_ARGS - {"request"}
            if extra:
                self.json(HTTPStatus.BAD_REQUEST, {"error": f"fork takes {', '.join(sorted(FORK_ARGS))}, "
                                                            f"not {', '.join(sorted(extra))}"})
                return
            args.update({k: v for k, v in body.items() if k in FORK_ARGS and v not in (None, "")})
        with self.server.dashboard.daemon.open_home() as h:  # an unknown run: 404 (serve), as for a read
            _run_id(h, run)
        request = body.get("request") or new_id()  # the page sends one per click: a retried click is a no-op
        refused = commands.check_request(action, args, request)  # the control socket's own check, said as a 400
        if refused is not None:
            self.json(HTTPStatus.BAD_REQUEST, {"ok": False, "error": refused})
            return
        answer = self.server.dashboard.command(action, args, request)
        if answer.get("ok"):
            self.json(HTTPStatus.OK, {"ok": True, "result": answer["result"]})
        else:
            log.info("dashboard action refused", action=action, run=run, error=answer.get("error"))
            self.json(HTTPStatus.CONFLICT, {"ok": False, "error": answer.get("error", "refused")})

    def page(self) -> None:
        nonce = secrets.token_urlsafe(16)
        html = resources.files("rloopd").joinpath("dashboard.html").read_text().replace("{{nonce}}", nonce)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        self.reply(HTTPStatus.OK, html.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": csp})

    def json(self, status: HTTPStatus, body: Any) -> None:
        self.reply(status, json.dumps(body, ensure_ascii=False, default=str).encode(), "application/json")

    def reply(self, status: HTTPStatus, data: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            for k, v in {"Content-Type": kind, "Content-Length": str(len(data)), "Cache-Control": "no-store",
                         "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                         "X-Frame-Options": "DENY", **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away: nothing to tell it
            pass
