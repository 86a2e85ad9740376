"""Redact credentials before anything an agent printed or wrote reaches the log or the blob store.

Two sources of secrets: the values of the session's environment variables whose names look like
credentials (`OPENAI_API_KEY`, `ANTHROPIC_AUTH_TOKEN`, `AWS_SECRET_ACCESS_KEY`, `DB_PASSWORD`...), which are
replaced wherever they appear, whatever their shape; and well-known key formats (OpenAI and Anthropic keys,
AWS access key ids, GitHub and Slack tokens, bearer headers, PEM private keys), replaced even when no
variable named them (an agent may read one from a file). A redacted value becomes `[REDACTED:NAME]`, so a
reader sees that something was there and where it came from, never what it was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH|COOKIE|SESSION_ID)", re.I)
MIN_SECRET_LEN = 8  # shorter values (a port, "true") would redact ordinary text
PATTERNS: list[tuple[str, re.Pattern[bytes]]] = [
    ("private-key", re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)),
    ("anthropic-key", re.compile(rb"sk-ant-[A-Za-z0-9_\-]{16,}")),
    ("openai-key", re.compile(rb"sk-(?:proj-|svcacct-)?[A-Za-z0-9_\-]{20,}")),
    ("aws-access-key", re.compile(rb"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("github-token", re.compile(rb"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,})\b")),
    ("slack-token", re.compile(rb"\bxox[abposr]-[A-Za-z0-9\-]{10,}")),
    ("bearer", re.compile(rb"(?i)(?<=authorization: bearer )[A-Za-z0-9._\-+/=]{12,}")),
]


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
        return data

    def redact_text(self, text: str) -> str:
        return self.redact(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")
