"""Redact credentials before anything an agent printed or wrote reaches the log or the blob store.

Two sources of secrets: the values of the session's environment variables whose names look like
credentials (`OPENAI_API_KEY`, `ANTHROPIC_AUTH_TOKEN`, `AWS_SECRET_ACCESS_KEY`, `DB_PASSWORD`...), which are
replaced wherever they appear, whatever their shape; and well-known key formats (OpenAI and Anthropic keys,
AWS access key ids, GitHub and Slack tokens, bearer headers, PEM private keys), replaced even when no
variable named them (an agent may read one from a file). A private key's body goes even when only part of
the key is there (`head` of a key file, or a key that a capped output cut in two). A redacted value becomes
`[REDACTED:NAME]`, so a reader sees that something was there and where it came from, never what it was.
`secret_reason(name, value)` is the same test for one variable, for those that must not hold a secret at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION_ID)", re.I)
MIN_SECRET_LEN = 8  # shorter values (a port, "true") would redact ordinary text
BODY = rb"[A-Za-z0-9+/= \t\\\r\n]"  # a byte of a PEM body: base64, indentation, newlines (escaped ones too)
PATTERNS: list[tuple[str, re.Pattern[bytes]]] = [
    # A whole key: at most 16 KiB long (a scan bounded for every BEGIN that has no END), and never across the
    # mark where session.py cut the output (the halves go by the two partial patterns, the mark stays).
    ("private-key", re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:(?!\n\[rloopd: ).){0,16384}?"
                               rb"-----END [A-Z ]*PRIVATE KEY-----", re.S)),
    ("anthropic-key", re.compile(rb"sk-ant-[A-Za-z0-9_\-]{16,}")),
    ("openai-key", re.compile(rb"sk-(?:proj-|svcacct-)?[A-Za-z0-9_\-]{20,}")),
    ("aws-access-key", re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("github-token", re.compile(rb"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})\b")),
    ("slack-token", re.compile(rb"\bxox[abposr]-[A-Za-z0-9\-]{10,}")),
    ("bearer", re.compile(rb"(?i)(?<=authorization: bearer )[A-Za-z0-9._\-+/=]{12,}")),
    # The start of a key whose end is not there: its header lines and body after the BEGIN line.
    ("private-key", re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----(?:" + BODY + rb"+|[A-Za-z-]+: [^\r\n\\]*)*")),
]
KEY_END = re.compile(rb"-----END [A-Z ]*PRIVATE KEY-----")
BEFORE_BODY = re.compile(rb"(?s).*[^" + BODY[1:])  # up to the last byte that cannot be part of a key's body


def secret_reason(name: str, value: str) -> str | None:
    """Why the variable `name=value` holds a secret (its name, or the key format its value has), or None."""
    if SECRET_NAME.search(name) and len(value) >= MIN_SECRET_LEN:
        return name
    data = value.encode("utf-8", "surrogateescape")
    return next((label for label, pattern in PATTERNS if pattern.search(data)), None)


def _key_ends(data: bytes) -> bytes:
    """The end of a key whose start is not there: the body before an `-----END ... PRIVATE KEY-----` that the
    patterns left (a whole key is already gone), back to the last byte that cannot be part of it."""
    out, done = [], 0
    for m in KEY_END.finditer(data):
        before = BEFORE_BODY.match(data, done, m.start())
        start = before.end() if before else done
        out += [data[done:start], b"[REDACTED:private-key]"]
        done = m.end()
    return b"".join(out) + data[done:] if out else data


class Redactor:
    """`redact(data)` for bytes and `redact_text(text)` for str, built once per session from its environment."""

    def __init__(self, env: Mapping[str, str] | None = None, extra: Mapping[str, str] | None = None):
        values: dict[bytes, str] = {}
        for name, value in {**(env or {}), **(extra or {})}.items():
            if SECRET_NAME.search(name) and value and len(value) >= MIN_SECRET_LEN:
                values[value.encode()] = name
        # Longest first, so a secret that contains another is replaced whole.
        self._values = sorted(values.items(), key=lambda kv: -len(kv[0]))

    def redact(self, data: bytes) -> bytes:
        for value, name in self._values:
            if value in data:
                data = data.replace(value, f"[REDACTED:{name}]".encode())
        for name, pattern in PATTERNS:
            data = pattern.sub(f"[REDACTED:{name}]".encode(), data)
        return _key_ends(data) if b"PRIVATE KEY-----" in data else data

    def redact_text(self, text: str) -> str:
        return self.redact(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
