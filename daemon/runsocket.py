"""A run's own socket: the only way an agent session reaches the daemon (`rloopd submit`, `rloopd result`).

Each session gets a socket in its private session directory, owned by the run's uid and mode 0600, so no
other run's agent can connect to it; it accepts only the ops its owner registers (`submit`, `result`) and
knows nothing of other runs, the control socket's commands or the home. The protocol is the control
socket's (one JSON object per line each way, DESIGN section 8): `{"op", "args"}` in, `{"ok", "result"}`
or `{"ok": false, "error", "exit_code"}` out. A submit waits for its experiment, so a reply may take as
long as the budget and evaluation; the client waits without a deadline unless given one.
"""

from __future__ import annotations

import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rloopd.control import CLIENT_SILENCE, exchange, not_utf8, read_message, write_message
from rloopd.errors import DaemonError, RloopdError, one_line

Handler = Callable[[dict[str, Any]], dict[str, Any]]
MAX_CONNECTIONS = 16  # served at once per run socket; more are answered at once and closed (no thread each)


MAX_SUBMIT_MESSAGE = 64 << 10  # bytes of a submit's message: it goes into the log and the snapshot's commit


class SubmitRefused(RloopdError):
    """A submit the run cannot take now (one is running, the window has closed, the session is over)."""


def submit_message(value: Any) -> str:
    """A submit's `message` as the run records it (stripped), or SubmitRefused naming `--message`: it must be
    UTF-8 text, not empty, without NUL bytes (no commit message holds one), and at most MAX_SUBMIT_MESSAGE."""
    if not isinstance(value, str):
        raise SubmitRefused(f"--message: must be text, not {type(value).__name__}")
    message = value.strip()
    if not message:
        raise SubmitRefused("--message: say what changed and why")
    if "\x00" in message:
        raise SubmitRefused("--message: contains a NUL byte")
    if not_utf8(message) is not None:
        raise SubmitRefused("--message: not valid UTF-8 text")
    size = len(message.encode())
    if size > MAX_SUBMIT_MESSAGE:
        raise SubmitRefused(f"--message: {size} bytes, over the {MAX_SUBMIT_MESSAGE} a submit takes: say what "
                            "changed in fewer words (notes.md holds the long story)")
    return message


class RunSocket:
    """Serve `handlers` on a Unix socket at `path` until `close()`."""

    def __init__(self, path: Path, handlers: dict[str, Handler], uid: int | None = None):
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        handlers = dict(handlers)

        class Conn(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(CLIENT_SILENCE)
                try:
                    msg = read_message(self.request, within=CLIENT_SILENCE)
                except (OSError, ValueError) as e:
                    reply = {"ok": False, "error": f"bad request: {e}", "exit_code": 2}
                else:
                    self.request.settimeout(None)
                    op, args = msg.get("op"), msg.get("args")
                    fn = handlers.get(op) if isinstance(op, str) else None
                    if fn is None:
                        reply = {"ok": False, "error": one_line(f"this socket takes {', '.join(sorted(handlers))}, "
                                                                f"not {op!r}"), "exit_code": 2}
                    elif args is not None and not isinstance(args, dict):
                        reply = {"ok": False, "error": f"bad request: args must be a JSON object, not "
                                                       f"{type(args).__name__}", "exit_code": 2}
                    else:
                        try:
                            reply = {"ok": True, "result": fn(args or {})}
                        except RloopdError as e:
                            reply = {"ok": False, "error": str(e), "exit_code": e.exit_code}
                        except Exception as e:  # noqa: BLE001 - the agent gets an answer, never a dropped line
                            reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}",
                                     "exit_code": 1}
                try:
                    write_message(self.request, reply)
                except OSError:
                    pass  # the agent hung up; what it asked for is recorded anyway

        slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

        class Server(socketserver.ThreadingUnixStreamServer):
            """A thread per connection up to MAX_CONNECTIONS: an agent that opens thousands and holds them
            open costs its own run its socket for a while, not the daemon its threads."""

            request_queue_size = 64

            def process_request(self, request, client_address) -> None:
                if not slots.acquire(blocking=False):
                    try:
                        request.setblocking(False)
                        write_message(request, {"ok": False, "exit_code": 2, "error":
                                                f"over {MAX_CONNECTIONS} connections to this run's socket at once"})
                    except OSError:
                        pass
                    self.shutdown_request(request)
                    return
                super().process_request(request, client_address)

            def process_request_thread(self, request, client_address) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        old = os.umask(0o177)
        try:
            self.server = Server(str(self.path), Conn)
        finally:
            os.umask(old)
        self.server.daemon_threads = True
        if uid is not None and os.geteuid() == 0:
            os.chown(self.path, uid, uid)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name=f"runsocket-{self.path.parent.name}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)


def call(path: Path | str, op: str, args: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
    """One request to a run socket; DaemonError (with the daemon's exit code) when it is refused."""
    bad = not_utf8(args or {})
    if bad is not None:
        raise DaemonError(f"{op}: argument {bad!r} is not valid UTF-8 text")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            reply = exchange(s, {"op": op, "args": args or {}}, limit=16 << 20)
    except (OSError, ValueError) as e:
        raise DaemonError(f"the run's socket {path} did not answer: {e}") from None
    if not reply.get("ok"):
        refused = DaemonError(str(reply.get("error", "refused")))
        refused.exit_code = int(reply.get("exit_code", DaemonError.exit_code))
        raise refused
    return reply.get("result") or {}
