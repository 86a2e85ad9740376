"""The control socket's protocol: one JSON object per line each way, with a size limit and a deadline.

A request is `{"op": NAME, "args": {...}, "request": ID}`; the reply is `{"ok": true, "result": {...}}`
or `{"ok": false, "error": "one line"}`. The request id makes a retried command idempotent: the daemon
uses it as the id of the event the command appends, so a command retried after a lost reply is a no-op.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from rloopd.errors import DaemonError
from rloopd.log import new_id

MAX_MESSAGE = 1 << 20  # bytes, either way
CLIENT_SILENCE = 10.0  # seconds the daemon waits for a request line before hanging up


def socket_path(home: Path) -> Path:
    return Path(home) / "rloopd.sock"


def read_message(sock: socket.socket, limit: int = MAX_MESSAGE, within: float | None = None) -> dict[str, Any]:
    """One newline-terminated JSON object; ValueError for an oversized, truncated or malformed one, or for
    one not complete `within` seconds (a peer sending a byte at a time must not hold a thread for ever)."""
    buf = bytearray()
    deadline = None if within is None else time.monotonic() + within
    while b"\n" not in buf:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ValueError(f"no complete request within {within:g} s")
            sock.settimeout(min(left, sock.gettimeout() or left))
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("the connection closed before a complete message")
        buf += chunk
        if len(buf) > limit:
            raise ValueError(f"message over {limit} bytes")
    line = bytes(buf[: buf.index(b"\n")])
    try:
        msg = json.loads(line)
    except RecursionError:  # deeper than the parser recurses: the thread must live to answer
        raise ValueError("not JSON: arrays or objects nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


def exchange(sock: socket.socket, msg: dict[str, Any], limit: int = MAX_MESSAGE) -> dict[str, Any]:
    """Send one request and read its reply. A peer that stops reading a request it refuses (one over its
    size limit) has written why before it hung up: that reply is read, not a broken pipe reported."""
    data = encode_message(msg)
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return read_message(sock, limit)


def encode_message(msg: dict[str, Any]) -> bytes:
    """One message's line; ValueError naming the key whose text is not UTF-8 (a lone surrogate)."""
    text = json.dumps(msg, ensure_ascii=False)
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:
        raise ValueError(f"{not_utf8(msg)}: not valid UTF-8 text") from None


def not_utf8(value: Any, where: str = "") -> str | None:
    """The key path (`args.name`) of the first key or string in `value` that UTF-8 cannot encode (a lone
    surrogate: bytes of a command-line argument that were not UTF-8); None when there is none."""
    if isinstance(value, str):
        return None if _encodes(value) else where or "a value"
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{where}.{k}" if where else str(k)
            if isinstance(k, str) and not _encodes(k):
                return path
            if (found := not_utf8(v, path)) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := not_utf8(v, f"{where}.{i}" if where else str(i))) is not None:
                return found
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def write_message(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall(encode_message(msg))


def call(home: Path, op: str, args: dict[str, Any] | None = None, *, request: str | None = None,
         timeout: float = 60.0) -> dict[str, Any]:
    """Send one request to the home's daemon and return its result; DaemonError with its one-line reason."""
    path = socket_path(home)
    msg = {"op": op, "args": args or {}, "request": request or new_id()}
    bad = not_utf8(msg["args"])
    if bad is not None:
        raise DaemonError(f"{op}: argument {bad!r} is not valid UTF-8 text")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            reply = exchange(s, msg)
    except (OSError, ValueError) as e:
        raise DaemonError(f"the daemon at {path} did not answer: {e}") from None
    if not reply.get("ok"):
        refused = DaemonError(str(reply.get("error", "the daemon refused the request")))
        refused.exit_code = int(reply.get("exit_code", DaemonError.exit_code))  # e.g. 1 for a failed verification
        raise refused
    return reply.get("result") or {}
