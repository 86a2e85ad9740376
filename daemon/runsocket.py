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

from rloopd.control import CLIENT_SILENCE, read_message, write_message
from rloopd.errors import DaemonError, RloopdError

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class SubmitRefused(RloopdError):
    """A submit the run cannot take now (one is running, the window has closed, the session is over)."""


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
                    msg = read_message(self.request)
                except (OSError, ValueError) as e:
                    reply = {"ok": False, "error": f"bad request: {e}", "exit_code": 2}
                else:
                    self.request.settimeout(None)
                    op = msg.get("op")
                    fn = handlers.get(op) if isinstance(op, str) else None
                    if fn is None:
                        reply = {"ok": False, "error": f"this socket takes {', '.join(sorted(handlers))}, not {op!r}",
                                 "exit_code": 2}
                    else:
                        try:
                            reply = {"ok": True, "result": fn(msg.get("args") or {})}
                        except RloopdError as e:
                            reply = {"ok": False, "error": str(e), "exit_code": e.exit_code}
                        except Exception as e:  # noqa: BLE001 - the agent gets an answer, never a dropped line
                            reply = {"ok": False, "error": f"internal error: {type(e).__name__}: {e}",
                                     "exit_code": 1}
                try:
                    write_message(self.request, reply)
                except OSError:
                    pass  # the agent hung up; what it asked for is recorded anyway

        old = os.umask(0o177)
        try:
            self.server = socketserver.ThreadingUnixStreamServer(str(self.path), Conn)
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
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            write_message(s, {"op": op, "args": args or {}})
            reply = read_message(s, limit=16 << 20)
    except (OSError, ValueError) as e:
        raise DaemonError(f"the run's socket {path} did not answer: {e}") from None
    if not reply.get("ok"):
        refused = DaemonError(str(reply.get("error", "refused")))
        refused.exit_code = int(reply.get("exit_code", DaemonError.exit_code))
        raise refused
    return reply.get("result") or {}
