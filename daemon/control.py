"""The control socket's protocol: one JSON object per line each way, with a size limit and a deadline.

A request is `{"op": NAME, "args": {...}, "request": ID}`; the reply is `{"ok": true, "result": {...}}`
or `{"ok": false, "error": "one line"}`. The request id makes a retried command idempotent: the daemon
uses it as the id of the event the command appends, so a command retried after a lost reply is a no-op.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from rloopd.errors import DaemonError
from rloopd.log import new_id

MAX_MESSAGE = 1 << 20  # bytes, either way
CLIENT_SILENCE = 10.0  # seconds the daemon waits for a request line before hanging up


def socket_path(home: Path) -> Path:
    return Path(home) / "rloopd.sock"


def read_message(sock: socket.socket, limit: int = MAX_MESSAGE) -> dict[str, Any]:
    """One newline-terminated JSON object; ValueError for an oversized, truncated or malformed one."""
    buf = bytearray()
    while b"\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("the connection closed before a complete message")
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"message over {limit} bytes")
    line = bytes(buf[: buf.index(b"\n")])
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


def write_message(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall(json.dumps(msg, ensure_ascii=False).encode() + b"\n")


def call(home: Path, op: str, args: dict[str, Any] | None = None, *, request: str | None = None,
         timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the home's daemon and return its result; DaemonError with its one-line reason."""
    path = socket_path(home)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            write_message(s, {"op": op, "args": args or {}, "request": request or new_id()})
            reply = read_message(s)
    except (OSError, ValueError) as e:
        raise DaemonError(f"the daemon at {path} did not answer: {e}") from None
    if not reply.get("ok"):
        refused = DaemonError(str(reply.get("error", "the daemon refused the request")))
        refused.exit_code = int(reply.get("exit_code", DaemonError.exit_code))  # e.g. 1 for a failed verification
        raise refused
    return reply.get("result") or {}
