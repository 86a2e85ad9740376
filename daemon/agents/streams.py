"""The JSON event streams of the coding-agent CLIs, read line by line into what rloopd records.

`codex exec --json` and `claude -p --output-format stream-json --verbose` print one JSON object a line.
A `StreamParser` turns each line into zero or more `Act`s (one `agent.acted` event each: a message, a
command with its exit code, a file edit, another tool call, a reasoning summary, or an `error`), and keeps
the session's token usage, its cost where the CLI reports one, and whether the CLI gave up on a provider
error (rate limit, overload, server error: reason `provider-error`, not a restart) or on something else (a
refused credential, an unknown model: reason `error`). A line that is not JSON, or JSON of a shape this
code does not know, is recorded as an `error` act and skipped: never fatal. The formats were taken from
the pinned CLIs run against tests/model_server.py (its docstring lists the events seen); tests/agents/
package.json pins the versions they were checked against.

Usage is normalised to one mapping for both: `input` (all input tokens, cached ones included), `output`
(reasoning included), `cached_input`, `cache_write`, `reasoning`. `tokens` (for spend caps) is input plus
output.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

SUMMARY = 300  # characters of a summary; the whole text goes into the detail blob
PROVIDER_STATUS = {408, 409, 429, 500, 502, 503, 504, 529}  # the provider's trouble, worth a later retry
_STATUS = re.compile(r"\b(?:status:?|API Error:)\s*(\d{3})\b|\b(\d{3}) (?:Too Many Requests|Overloaded|Internal|"
                     r"Bad Gateway|Service Unavailable|Gateway Timeout)", re.IGNORECASE)


@dataclass
class Act:
    kind: str  # message, command, edit, tool, reasoning, error
    summary: str
    detail: str | None = None


@dataclass
class StreamParser:
    """Base: the per-session totals; subclasses implement `_event`."""

    name: str = "agent"
    usage: dict[str, int] = field(default_factory=dict)
    cost_usd: float | None = None
    failure: str | None = None  # "provider-error" or "error" when the CLI gave up, with `failure_detail`
    failure_detail: str = ""
    retries: int = 0  # provider errors the CLI retried
    lines: int = 0
    malformed: int = 0
    began: dict[str, float] = field(default_factory=dict)  # a command's id -> when its start was read
    clock: Any = time.monotonic  # the CLIs print no durations: rloopd times start and end as they arrive

    def took(self, key: str) -> str:
        """` in 1.2 s` for a command whose start was seen, else ``."""
        start = self.began.pop(key, None)
        return "" if start is None else f" in {self.clock() - start:.1f} s"

    def feed(self, line: bytes | str) -> list[Act]:
        """The acts one line of the stream yields (an `error` act for a line that cannot be read)."""
        text = line.decode(errors="replace") if isinstance(line, bytes) else line
        text = text.strip()
        if not text:
            return []
        self.lines += 1
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError("not a JSON object")
            return self._event(event)
        except Exception as e:  # noqa: BLE001 - any line, however made (RecursionError included), is skipped
            self.malformed += 1
            return [Act("error", f"{self.name}: unreadable stream line skipped ({type(e).__name__}: "
                                 f"{_short(str(e), 80)}): {_short(text, 120)}", text)]

    def finish(self) -> list[Act]:
        """Acts still pending when the stream ends (a tool call whose result never came)."""
        return []

    @property
    def tokens(self) -> int:
        return self.usage.get("input", 0) + self.usage.get("output", 0)

    def _event(self, event: dict[str, Any]) -> list[Act]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _gave_up(self, message: str, status: int | None = None) -> None:
        status = status if status is not None else _status_in(message)
        provider = status in PROVIDER_STATUS or bool(re.search(
            r"overload|rate.?limit|too many requests|high demand|stream disconnected|timed? ?out", message, re.I))
        self.failure = "provider-error" if provider else "error"
        self.failure_detail = _short(message, 500)
        if status in (401, 403) or re.search(r"api.?key|unauthori[sz]ed|authenticat|credential", message, re.I):
            self.failure_detail = (f"the provider refused the credentials (set the key in the daemon's environment, "
                                   f"e.g. the service's environment file): {self.failure_detail}")


class CodexStream(StreamParser):
    """`codex exec --json`: thread/turn lifecycle events and items (command_execution, file_change,
    agent_message, reasoning, mcp_tool_call, web_search, error), usage on turn.completed."""

    def __init__(self) -> None:
        super().__init__(name="codex")

    def _event(self, event: dict[str, Any]) -> list[Act]:
        kind = event["type"]
        if kind == "item.started" and isinstance(event.get("item"), dict):
            self.began[str(event["item"].get("id"))] = self.clock()
            return []
        if kind == "item.completed":
            return self._item(event["item"])
        if kind == "turn.completed":
            u = event.get("usage") or {}
            for ours, theirs in (("input", "input_tokens"), ("cached_input", "cached_input_tokens"),
                                 ("cache_write", "cache_write_input_tokens"), ("output", "output_tokens"),
                                 ("reasoning", "reasoning_output_tokens")):
                if _count(u.get(theirs)):
                    self.usage[ours] = self.usage.get(ours, 0) + u[theirs]
            return []
        if kind == "error":  # "Reconnecting... n/N (...)" while it retries, or the error it gives up on
            message = str(event.get("message", ""))
            if message.startswith("Reconnecting"):
                self.retries += 1
            return [Act("error", f"codex: {_short(message, SUMMARY)}", message)]
        if kind == "turn.failed":
            message = str((event.get("error") or {}).get("message", "the turn failed"))
            self._gave_up(message)
            return [Act("error", f"codex gave up: {_short(message, SUMMARY)}", message)]
        return []  # thread.started, turn.started, item.started, item.updated: nothing final yet

    def _item(self, item: dict[str, Any]) -> list[Act]:
        t = item["type"]
        if t == "command_execution":
            command = _unwrap_shell(str(item.get("command", "")))
            code = item.get("exit_code")
            return [Act("command", f"{_short(command, SUMMARY)} -> exit {code}{self.took(str(item.get('id')))}",
                        f"$ {command}\n{item.get('aggregated_output') or ''}\n[exit {code}]")]
        if t == "file_change":
            changes = item.get("changes") or []
            return [Act("edit", f"{c.get('kind', 'update')} {c.get('path', '?')}", None) for c in changes]
        if t == "agent_message":
            text = str(item.get("text", ""))
            return [Act("message", _short(text, SUMMARY), text)]
        if t == "reasoning":
            text = str(item.get("text", ""))
            return [Act("reasoning", _short(text, SUMMARY), text)]
        if t == "error":
            message = str(item.get("message", ""))
            return [Act("error", f"codex: {_short(message, SUMMARY)}", message)]
        name = item.get("tool") or item.get("query") or t  # mcp_tool_call, web_search, todo_list, ...
        return [Act("tool", _short(f"{t}: {name}", SUMMARY), json.dumps(item)[:100_000])]


class ClaudeStream(StreamParser):
    """`claude -p --output-format stream-json --verbose`: system lines (init, api_retry), one `assistant`
    line per content block (text, thinking, tool_use), `user` lines with tool results, a final `result`
    with usage and cost. A tool call is recorded when its result arrives, with its exit code."""

    EDIT_TOOLS = {"Edit", "MultiEdit", "Write", "NotebookEdit"}

    def __init__(self) -> None:
        super().__init__(name="claude")
        self.pending: dict[str, dict[str, Any]] = {}
        self.message_usage: dict[str, dict[str, int]] = {}  # partial usage per message id, until `result`

    def _event(self, event: dict[str, Any]) -> list[Act]:
        kind = event["type"]
        if kind == "assistant":
            message = event["message"]
            if isinstance(message.get("usage"), dict) and message.get("id"):
                self.message_usage[message["id"]] = _claude_usage(message["usage"])
                self._live_usage()
            acts = []
            for block in message.get("content") or []:
                acts += self._block(block)
            return acts
        if kind == "user":
            acts = []
            content = (event.get("message") or {}).get("content")
            for block in content if isinstance(content, list) else []:
                if isinstance(block, dict) and block.get("type") == "tool_result":
                    acts += self._result(block)
            return acts
        if kind == "system" and event.get("subtype") == "api_retry":
            self.retries += 1
            status, error = event.get("error_status"), event.get("error", "")
            return [Act("error", f"claude: provider error {status} ({error}), retry {event.get('attempt')} of "
                                 f"{event.get('max_retries')}", json.dumps(event))]
        if kind == "result":
            if isinstance(event.get("usage"), dict):
                self.usage = _claude_usage(event["usage"])
            cost = event.get("total_cost_usd")
            if isinstance(cost, (int, float)) and not isinstance(cost, bool) and 0 <= cost < 1e9:
                self.cost_usd = float(event["total_cost_usd"])
            if event.get("is_error") or event.get("subtype", "success") != "success":
                status = event.get("api_error_status")
                message = str(event.get("result") or event.get("subtype") or "the session failed")
                self._gave_up(message, status if isinstance(status, int) else None)
                return [Act("error", f"claude gave up: {_short(message, SUMMARY)}", message)]
            return []
        return []  # system/init, system/thinking_tokens, stream events: nothing to record

    def _live_usage(self) -> None:
        total: dict[str, int] = {}
        for u in self.message_usage.values():
            for k, v in u.items():
                total[k] = total.get(k, 0) + v
        self.usage = total

    def _block(self, block: dict[str, Any]) -> list[Act]:
        t = block.get("type")
        if t == "text":
            text = str(block.get("text", ""))
            return [Act("message", _short(text, SUMMARY), text)] if text.strip() else []
        if t == "thinking":
            text = str(block.get("thinking", ""))
            return [Act("reasoning", _short(text, SUMMARY), text)] if text.strip() else []
        if t == "tool_use":
            self.pending[str(block.get("id"))] = block
            self.began[str(block.get("id"))] = self.clock()
        return []

    def _result(self, block: dict[str, Any]) -> list[Act]:
        key = str(block.get("tool_use_id"))
        use = self.pending.pop(key, None) or {"name": "?", "input": {}}
        output = block.get("content")
        if isinstance(output, list):
            output = "\n".join(str(c.get("text", "")) for c in output if isinstance(c, dict))
        act = _claude_act(use, str(output or ""), bool(block.get("is_error")))
        if act.kind == "command":
            act.summary += self.took(key)
        return [act]

    def finish(self) -> list[Act]:
        acts = [_claude_act(use, "", None) for use in self.pending.values()]
        self.pending.clear()
        return acts


def _claude_act(use: dict[str, Any], output: str, is_error: bool | None) -> Act:
    name, args = str(use.get("name")), use.get("input") or {}
    status = "no result" if is_error is None else ("error" if is_error else "ok")
    if name == "Bash":
        command = str(args.get("command", ""))
        code: int | str | None = None if is_error is None else 0
        if is_error:
            m = re.match(r"(?:Error: )?Exit code (\d+)", output)
            code = int(m.group(1)) if m else "error"
        return Act("command", f"{_short(command, SUMMARY)} -> exit {code}", f"$ {command}\n{output}\n[exit {code}]")
    if name in ClaudeStream.EDIT_TOOLS:
        path = args.get("file_path") or args.get("notebook_path") or "?"
        return Act("edit", f"{name.lower()} {path} ({status})", json.dumps(args)[:100_000])
    return Act("tool", _short(f"{name} {json.dumps(args)} ({status})", SUMMARY),
               f"{json.dumps(args)[:50_000]}\n---\n{output[:50_000]}")


def _claude_usage(u: dict[str, Any]) -> dict[str, int]:
    def n(key: str) -> int:
        return u[key] if _count(u.get(key)) else 0

    read, write = n("cache_read_input_tokens"), n("cache_creation_input_tokens")
    out = {"input": n("input_tokens") + read + write, "output": n("output_tokens")}
    if read:
        out["cached_input"] = read
    if write:
        out["cache_write"] = write
    return out


def _count(value: Any) -> bool:
    """A token count as the CLIs print them: a non-negative int (the stream is the agent's process's
    output, so nothing in it is trusted further than that)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**12


def _unwrap_shell(command: str) -> str:
    """`/usr/bin/bash -lc 'cat x'` -> `cat x` (Codex wraps every command in a login shell)."""
    m = re.fullmatch(r"(?:/usr)?/bin/(?:ba)?sh -l?c (['\"])(.*)\1", command, re.S)
    if m is None:
        return command
    return m.group(2).replace("'\\''", "'") if m.group(1) == "'" else m.group(2).replace('\\"', '"')


def _status_in(message: str) -> int | None:
    m = _STATUS.search(message)
    return int(m.group(1) or m.group(2)) if m else None


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


PARSERS = {"codex": CodexStream, "claude": ClaudeStream}
