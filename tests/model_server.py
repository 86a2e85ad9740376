"""A scripted model server for testing real coding-agent CLIs (Codex, Claude Code) offline.

``ModelServer(script)`` listens on 127.0.0.1 (a free port), speaks the two streaming protocols the CLIs use,
and plays a SCRIPT of model turns: each main model request gets the next turn; after the script it answers
with a short final message and no tool calls.  Every request is recorded (``server.requests``), so a test can
assert what the CLI sent back (tool outputs, exit codes, file contents).  Use it as a context manager::

    script = [
        Turn([("shell", "cat program.md")]),
        Turn([("edit", "train.py", "LR = 0.1", "LR = 0.2")]),
        Turn([("shell", "echo submitted"), ("write", "notes.md", "tried LR 0.2\\n")]),
        Turn(text="Done."),
    ]
    with ModelServer(script, cwd=run_dir) as srv:
        env = codex_env(codex_home, srv)          # or claude_env(home, srv)
        ...
    srv.tool_outputs()        # {call_id: {name, arguments, output, is_error}} from the last main request

or through the ``model_server`` fixture (``from .model_server import model_server  # noqa: F401``), a factory
whose servers stop at the end of the test: ``srv = model_server(script, cwd=run_dir)``.

Generic tool calls in a turn (mapped to each CLI's own tools):
    ("shell", command)             Codex: exec_command {"cmd": command}   Claude Code: Bash {"command": command}
    ("read", path)                 Codex: exec_command "cat 'path'"       Claude Code: Read {"file_path": abs}
    ("edit", path, old, new)       Codex: apply_patch (old/new must be WHOLE lines)
                                   Claude Code: Read (first time the file is touched) + Edit
    ("write", path, content)       Codex: apply_patch "*** Add File"      Claude Code: Write
    ("raw", name, arguments)       the CLI's tool ``name`` with these arguments (a dict; a str for Codex's
                                   freeform tools), for anything else
``ErrorTurn(status)`` answers one main request with a provider error (429 or 5xx/529) in the provider's own
JSON shape; ``ErrorTurn(status, in_stream=True)`` sends it as an error event inside a 200 SSE stream instead;
``ErrorTurn(disconnect=True)`` starts a 200 stream and drops the connection after its first event.  Each error
turn answers one request: a CLI that retries gets the next entry of the script, so repeat an ErrorTurn to make
the error persist.

Protocols
---------
Codex (``codex exec``, custom provider ``base_url = http://127.0.0.1:PORT/v1``, ``wire_api = "responses"``):
    POST /v1/responses, ``stream: true``, ``authorization: Bearer <value of env_key>``, ``originator: codex_exec``,
    an ``x-codex-turn-metadata`` JSON header; the body has ``model``, ``input`` items (the system prompt as
    developer messages, the user prompt, then ``function_call`` + ``function_call_output`` and
    ``custom_tool_call`` + ``custom_tool_call_output`` items for earlier turns; no ``instructions``),
    ``tools``, ``reasoning``, ``store: false``, ``include: ["reasoning.encrypted_content"]``.
    Answered with SSE ``event: X\\ndata: {json}``: response.created, response.in_progress, then per item response.output_item.added,
    (response.output_text.delta | response.function_call_arguments.delta | response.custom_tool_call_input.delta |
    response.reasoning_summary_text.delta), response.output_item.done, and finally response.completed whose
    ``response.usage`` has input_tokens, input_tokens_details.cached_tokens, output_tokens,
    output_tokens_details.reasoning_tokens, total_tokens.  Errors: HTTP status + ``{"error": {"message", "type",
    "param", "code"}}``, or an in-stream ``response.failed`` event.
    Tools codex-cli 0.171.0 offers with model gpt-5.5 (from the request's ``tools``): function ``exec_command``
    {cmd, workdir, yield_time_ms, max_output_tokens, tty, shell, login, sandbox_permissions, justification,
    prefix_rule}, function ``write_stdin``, custom (freeform grammar) ``apply_patch``, ``view_image``,
    ``request_user_input``, ``get_goal``/``create_goal``/``update_goal``, ``tool_search``, ``web_search``.
    With an unknown model slug it warns "Model metadata ... not found" and offers no apply_patch tool, so the
    tests use a slug from its bundled catalogue (``codex debug models --bundled``), e.g. gpt-5.5.
    exec_command's function_call_output is plain text: "Chunk ID: ..\\nWall time: 0.17 seconds\\nProcess exited
    with code 0\\nOriginal token count: 3\\nOutput:\\n<output>"; apply_patch's: "Exit code: 0\\nWall time: ..
    \\nOutput:\\nSuccess. Updated the following files:\\nM train.py\\n".
Claude Code (``ANTHROPIC_BASE_URL=http://127.0.0.1:PORT``):
    HEAD / (a connectivity probe, answered 200), then POST /v1/messages?beta=true with ``x-api-key``,
    ``anthropic-version: 2023-06-01``, ``anthropic-beta`` and ``stream: true``; the main requests carry
    ``tools`` (Bash, Edit, Write, Read, Agent, WebFetch, WebSearch, Task*, Cron*, Skill, ... in 2.1.197) and
    ``system``.  Answered with SSE: message_start (usage.input_tokens), then per block content_block_start
    (text | tool_use | thinking), content_block_delta (text_delta | input_json_delta | thinking_delta +
    signature_delta), content_block_stop, then message_delta (stop_reason tool_use|end_turn, usage.output_tokens)
    and message_stop.  Errors: HTTP status + ``{"type": "error", "error": {"type": "rate_limit_error" |
    "overloaded_error" | "api_error", "message"}}`` (529 = overloaded) or an in-stream ``error`` event.
    Requests without ``tools`` (quick side queries) and POST /v1/messages/count_tokens do not consume turns.
    Tool results come back as ``tool_result`` blocks in the next user message (``is_error`` on failures).

Event types the CLIs' JSON output showed in these runs (examples in tests/test_model_server.py)
---------------------------------------------------------------------------------------------
codex exec --json: thread.started, turn.started, item.started / item.completed with item.type
    command_execution (command, aggregated_output, exit_code, status completed|failed; no duration),
    file_change (changes: [{path, kind update|add}], status), agent_message (text), reasoning (text; completed
    only), error (warnings such as unknown model metadata), then turn.completed (usage: input_tokens,
    cached_input_tokens, cache_write_input_tokens, output_tokens, reasoning_output_tokens; summed over the
    turn's requests), or error (also "Reconnecting... n/N (...)" during retries) and turn.failed.
claude -p --output-format stream-json --verbose: system/init (tools, model, permissionMode, cwd,
    session_id, claude_code_version, apiKeySource), system/thinking_tokens, system/api_retry (attempt,
    max_retries, retry_delay_ms, error_status, error), assistant (one content block each: text | tool_use |
    thinking), user (tool_result block, plus a ``tool_use_result`` object or string), and result (subtype
    success, is_error, api_error_status, num_turns, duration_ms, duration_api_ms, result, usage, modelUsage,
    total_cost_usd, permission_denials).

Surprises
---------
* Codex: with CODEX_HOME under /tmp it warns on stderr that it refuses to create PATH helper binaries there
  (harmless).  It prints "Reading additional input from stdin..." unless stdin is closed: run it with
  stdin=DEVNULL.  Analytics are on unless ``[analytics] enabled = false`` (the request's x-codex-turn-metadata
  header reports ``analytics_enabled``); ``check_for_update_on_startup = false`` stops the update check.
  At startup it syncs a curated plugin list (git ls-remote github.com/openai/plugins, then api.github.com, then
  chatgpt.com/backend-api/plugins/export/curated) unless ``[features] plugins = false`` (with remote_plugin
  and apps off too); with the config below strace shows no connection except to 127.0.0.1.
  ``stream_max_retries`` on the provider governs its visible retries ("Reconnecting... n/N") of 429, 5xx,
  failed and dropped streams; ``request_max_retries`` adds silent HTTP retries of 5xx only.
  Commands run as ``/bin/bash -lc CMD`` (a login shell: give it a HOME of its own).
* Claude Code: refuses --dangerously-skip-permissions as root unless IS_SANDBOX=1.  Probes HEAD / first.
  With CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 it made no side requests at all in -p mode (no title or
  count_tokens calls) and strace shows no connection except to 127.0.0.1.  It retries 429/529 (and a 401
  once) up to 10 times with backoff, printing system/api_retry lines; CLAUDE_CODE_MAX_RETRIES caps that.
  After a dropped stream it retries the request without ``stream`` (non-streaming), silently; after an
  in-stream error event it retries streaming, silently.
  stream-json prints one ``assistant`` line per content block (all with the same message.id and a partial
  usage); the totals are in the final ``result`` line.
  The path has a ``?beta=true`` query.  Messages may contain ``role: "system"`` entries mid-conversation.
  Edit/Write of an existing file fail with "File has not been read yet" unless the file was Read in the
  conversation, hence the automatic Read before the first edit of a file.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

Call = tuple  # ("shell", cmd) | ("read", path) | ("edit", path, old, new) | ("write", path, content) | ("raw", ...)


@dataclass
class Turn:
    """One model answer: optional reasoning, then tool calls and/or a text message."""

    calls: list[Call] = field(default_factory=list)
    text: str | None = None
    reasoning: str | None = None
    input_tokens: int = 1000
    cached_tokens: int = 0
    output_tokens: int = 50


@dataclass
class ErrorTurn:
    """A provider error instead of an answer: HTTP ``status`` (429, 500, 503, 529, ...) in the provider's
    JSON shape, or, with ``in_stream``, an HTTP 200 stream that fails with an error event."""

    status: int = 429
    message: str | None = None
    retry_after: float | None = 0
    in_stream: bool = False
    disconnect: bool = False  # instead: a 200 stream that stops after its first event and closes the connection


@dataclass
class Request:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any  # parsed JSON, or the raw text when it is not JSON
    protocol: str  # "openai" | "anthropic" | "other"
    main: bool  # a main model request (it consumed a script turn)
    turn: int | None  # the index of the script entry it got (None: side request, or past the end)
    status: int = 200


def _as_turn(entry) -> Turn | ErrorTurn:
    if isinstance(entry, (Turn, ErrorTurn)):
        return entry
    if isinstance(entry, str):
        return Turn(text=entry)
    if isinstance(entry, tuple):
        return Turn(calls=[entry])
    if isinstance(entry, list):
        calls = [e for e in entry if isinstance(e, tuple)]
        texts = [e for e in entry if isinstance(e, str)]
        return Turn(calls=calls, text="\n".join(texts) or None)
    raise TypeError(f"not a script turn: {entry!r}")


def _sse(events: Iterable[tuple[str, dict]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def _shell_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def apply_patch_text(call: Call) -> str:
    """The apply_patch grammar Codex's freeform tool takes, for an "edit" or "write" call."""
    if call[0] == "write":
        _, path, content = call
        lines = content.splitlines() or [""]
        return "*** Begin Patch\n*** Add File: " + path + "\n" + "".join(f"+{ln}\n" for ln in lines) + "*** End Patch\n"
    _, path, old, new = call
    body = "".join(f"-{ln}\n" for ln in old.splitlines()) + "".join(f"+{ln}\n" for ln in new.splitlines())
    return f"*** Begin Patch\n*** Update File: {path}\n@@\n{body}*** End Patch\n"


class ModelServer:
    """The scripted server; see the module docstring."""

    def __init__(self, script: Iterable = (), *, cwd: str | os.PathLike | None = None,
                 final_text: str = "Nothing more to do.", model: str | None = None):
        """``cwd``: the run directory as the CLI sees it, to make Claude Code's paths absolute (without it,
        the working directory its system prompt names); ``model``: the model name to answer with (default:
        the requested one)."""
        self.script: list[Turn | ErrorTurn] = [_as_turn(t) for t in script]
        self.cwd = Path(cwd) if cwd is not None else None
        self.final_text = final_text
        self.model = model
        self.requests: list[Request] = []
        self.errors: list[str] = []  # problems the server met (unknown tools, bad bodies): tests may assert empty
        self._cursor = 0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._read_paths: set[str] = set()  # files the Claude Code session has Read (Edit needs that)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> ModelServer:
        server = self

        class Handler(_Handler):
            model_server = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="model-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "the server is not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The root URL: Claude Code's ANTHROPIC_BASE_URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """Codex's model_providers.X.base_url."""
        return self.url + "/v1"

    # -- what tests look at ------------------------------------------------------------------------------
    @property
    def turns_played(self) -> int:
        return self._cursor

    def main_requests(self) -> list[Request]:
        return [r for r in self.requests if r.main]

    def tool_outputs(self) -> dict[str, dict]:
        """{call_id: {"name", "arguments", "output", "is_error"}} for every tool call the CLI answered, read
        from the last main request (which carries the whole conversation)."""
        mains = self.main_requests()
        if not mains:
            return {}
        body = mains[-1].body
        out: dict[str, dict] = {}
        if mains[-1].protocol == "openai":
            for item in body.get("input", []):
                t = item.get("type")
                if t in ("function_call", "custom_tool_call"):
                    out.setdefault(item["call_id"], {})
                    out[item["call_id"]].update(name=item.get("name"),
                                                arguments=item.get("arguments", item.get("input")))
                elif t in ("function_call_output", "custom_tool_call_output"):
                    o = item.get("output")
                    if isinstance(o, dict):  # {"content": ..., "success": ...} in some versions
                        o = o.get("content", json.dumps(o))
                    elif isinstance(o, list):
                        o = "".join(p.get("text", "") for p in o if isinstance(p, dict))
                    out.setdefault(item["call_id"], {})["output"] = o
        else:
            for msg in body.get("messages", []):
                if not isinstance(msg.get("content"), list):
                    continue
                for block in msg["content"]:
                    if block.get("type") == "tool_use":
                        out.setdefault(block["id"], {}).update(name=block["name"], arguments=block["input"])
                    elif block.get("type") == "tool_result":
                        c = block.get("content")
                        if isinstance(c, list):
                            c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
                        out.setdefault(block["tool_use_id"], {}).update(output=c, is_error=bool(block.get("is_error")))
        return out

    # -- the script --------------------------------------------------------------------------------------
    def _next_turn(self) -> tuple[int | None, Turn | ErrorTurn]:
        with self._lock:
            if self._cursor < len(self.script):
                self._cursor += 1
                return self._cursor - 1, self.script[self._cursor - 1]
            return None, Turn(text=self.final_text)

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):04d}"

    def _abs(self, path: str, body: dict | None = None) -> str:
        if os.path.isabs(path):
            return path
        cwd = self.cwd
        if cwd is None and body is not None:  # Claude Code's system prompt names its working directory
            system = body.get("system")
            text = json.dumps(system) if system is not None else ""
            m = re.search(r"working directory: ([^\\\"\n]+)", text, re.I)
            if m:
                cwd = Path(m.group(1).strip())
        return str(cwd / path) if cwd is not None else path

    # -- OpenAI Responses (Codex) ------------------------------------------------------------------------
    def openai_items(self, turn: Turn, body: dict) -> list[dict]:
        tools = {t.get("name"): t for t in body.get("tools", []) if isinstance(t, dict)}
        items: list[dict] = []
        if turn.reasoning:
            items.append({"type": "reasoning", "id": self._id("rs"),
                          "summary": [{"type": "summary_text", "text": turn.reasoning}],
                          "content": None, "encrypted_content": None})
        for call in turn.calls:
            kind = call[0]
            if kind in ("shell", "read"):
                cmd = call[1] if kind == "shell" else "cat " + _shell_quote(call[1])
                if "exec_command" in tools:
                    name, args = "exec_command", {"cmd": cmd, "yield_time_ms": 10000}
                elif "shell_command" in tools:
                    name, args = "shell_command", {"command": cmd}
                elif "shell" in tools:
                    name, args = "shell", {"command": ["bash", "-lc", cmd]}
                else:
                    self.errors.append(f"no shell tool among {sorted(tools)}")
                    name, args = "exec_command", {"cmd": cmd}
                items.append(self._function_call(name, json.dumps(args)))
            elif kind in ("edit", "write"):
                patch = apply_patch_text(call)
                tool = tools.get("apply_patch")
                if tool is not None and tool.get("type") == "custom":
                    items.append(self._custom_call("apply_patch", patch))
                elif tool is not None:
                    items.append(self._function_call("apply_patch", json.dumps({"input": patch})))
                else:
                    self.errors.append(f"no apply_patch tool among {sorted(tools)}")
                    items.append(self._custom_call("apply_patch", patch))
            elif kind == "raw":
                _, name, args = call
                if isinstance(args, str):
                    items.append(self._custom_call(name, args))
                else:
                    items.append(self._function_call(name, json.dumps(args)))
            else:
                raise ValueError(f"unknown call {call!r}")
        if turn.text is not None:
            items.append({"type": "message", "id": self._id("msg"), "role": "assistant", "status": "completed",
                          "content": [{"type": "output_text", "text": turn.text, "annotations": []}]})
        return items

    def _function_call(self, name: str, arguments: str) -> dict:
        return {"type": "function_call", "id": self._id("fc"), "call_id": self._id("call"), "name": name,
                "arguments": arguments, "status": "completed"}

    def _custom_call(self, name: str, input_: str) -> dict:
        return {"type": "custom_tool_call", "id": self._id("ctc"), "call_id": self._id("call"), "name": name,
                "input": input_, "status": "completed"}

    def openai_stream(self, turn: Turn, body: dict) -> bytes:
        rid = self._id("resp")
        model = self.model or body.get("model", "scripted")
        base = {"id": rid, "object": "response", "created_at": int(time.time()), "model": model,
                "status": "in_progress", "output": [], "usage": None}
        items = self.openai_items(turn, body)
        events: list[tuple[str, dict]] = [("response.created", {"response": base}),
                                          ("response.in_progress", {"response": base})]
        for i, item in enumerate(items):
            started = dict(item, status="in_progress")
            t = item["type"]
            if t == "message":
                started["content"] = []
            elif t == "function_call":
                started["arguments"] = ""
            elif t == "custom_tool_call":
                started["input"] = ""
            events.append(("response.output_item.added", {"output_index": i, "item": started}))
            if t == "message":
                text = item["content"][0]["text"]
                part = {"type": "output_text", "text": "", "annotations": []}
                events.append(("response.content_part.added",
                               {"item_id": item["id"], "output_index": i, "content_index": 0, "part": part}))
                events.append(("response.output_text.delta",
                               {"item_id": item["id"], "output_index": i, "content_index": 0, "delta": text}))
                events.append(("response.output_text.done",
                               {"item_id": item["id"], "output_index": i, "content_index": 0, "text": text}))
                events.append(("response.content_part.done",
                               {"item_id": item["id"], "output_index": i, "content_index": 0,
                                "part": item["content"][0]}))
            elif t == "function_call":
                events.append(("response.function_call_arguments.delta",
                               {"item_id": item["id"], "output_index": i, "delta": item["arguments"]}))
                events.append(("response.function_call_arguments.done",
                               {"item_id": item["id"], "output_index": i, "arguments": item["arguments"]}))
            elif t == "custom_tool_call":
                events.append(("response.custom_tool_call_input.delta",
                               {"item_id": item["id"], "output_index": i, "delta": item["input"]}))
                events.append(("response.custom_tool_call_input.done",
                               {"item_id": item["id"], "output_index": i, "input": item["input"]}))
            elif t == "reasoning":
                text = item["summary"][0]["text"]
                events.append(("response.reasoning_summary_part.added",
                               {"item_id": item["id"], "output_index": i, "summary_index": 0,
                                "part": {"type": "summary_text", "text": ""}}))
                events.append(("response.reasoning_summary_text.delta",
                               {"item_id": item["id"], "output_index": i, "summary_index": 0, "delta": text}))
                events.append(("response.reasoning_summary_text.done",
                               {"item_id": item["id"], "output_index": i, "summary_index": 0, "text": text}))
                events.append(("response.reasoning_summary_part.done",
                               {"item_id": item["id"], "output_index": i, "summary_index": 0,
                                "part": {"type": "summary_text", "text": text}}))
            events.append(("response.output_item.done", {"output_index": i, "item": item}))
        reasoning_tokens = 10 if turn.reasoning else 0
        done = dict(base, status="completed", output=items, usage={
            "input_tokens": turn.input_tokens,
            "input_tokens_details": {"cached_tokens": turn.cached_tokens},
            "output_tokens": turn.output_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": turn.input_tokens + turn.output_tokens})
        events.append(("response.completed", {"response": done}))
        return _sse((name, {"type": name, "sequence_number": n, **data}) for n, (name, data) in enumerate(events))

    @staticmethod
    def openai_error(err: ErrorTurn) -> dict:
        if err.status == 429:
            return {"error": {"message": err.message or "Rate limit reached for requests. Please try again in 1s.",
                              "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
        return {"error": {"message": err.message or "The server had an error while processing your request.",
                          "type": "server_error", "param": None, "code": "server_error"}}

    # -- Anthropic Messages (Claude Code) ----------------------------------------------------------------
    def anthropic_blocks(self, turn: Turn, body: dict) -> list[dict]:
        blocks: list[dict] = []
        if turn.reasoning:
            blocks.append({"type": "thinking", "thinking": turn.reasoning, "signature": "c2NyaXB0ZWQ="})
        for call in turn.calls:
            kind = call[0]
            if kind == "shell":
                blocks.append(self._tool_use("Bash", {"command": call[1], "description": "Run " + call[1][:40]}))
            elif kind == "read":
                path = self._abs(call[1], body)
                self._read_paths.add(path)
                blocks.append(self._tool_use("Read", {"file_path": path}))
            elif kind == "edit":
                _, rel, old, new = call
                path = self._abs(rel, body)
                if path not in self._read_paths:
                    self._read_paths.add(path)
                    blocks.append(self._tool_use("Read", {"file_path": path}))
                blocks.append(self._tool_use("Edit", {"file_path": path, "old_string": old, "new_string": new}))
            elif kind == "write":
                _, rel, content = call
                path = self._abs(rel, body)
                if os.path.exists(path) and path not in self._read_paths:
                    self._read_paths.add(path)
                    blocks.append(self._tool_use("Read", {"file_path": path}))
                blocks.append(self._tool_use("Write", {"file_path": path, "content": content}))
            elif kind == "raw":
                _, name, args = call
                blocks.append(self._tool_use(name, args))
            else:
                raise ValueError(f"unknown call {call!r}")
        if turn.text is not None:
            blocks.append({"type": "text", "text": turn.text})
        return blocks

    def _tool_use(self, name: str, args: dict) -> dict:
        return {"type": "tool_use", "id": self._id("toolu"), "name": name, "input": args}

    def anthropic_message(self, turn: Turn, body: dict, blocks: list[dict]) -> dict:
        stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
        return {"id": self._id("msg"), "type": "message", "role": "assistant",
                "model": self.model or body.get("model", "scripted"), "content": blocks,
                "stop_reason": stop, "stop_sequence": None,
                "usage": {"input_tokens": turn.input_tokens, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": turn.cached_tokens, "output_tokens": turn.output_tokens}}

    def anthropic_stream(self, message: dict) -> bytes:
        start = dict(message, content=[], stop_reason=None,
                     usage=dict(message["usage"], output_tokens=1))
        events: list[tuple[str, dict]] = [("message_start", {"message": start}), ("ping", {})]
        for i, block in enumerate(message["content"]):
            t = block["type"]
            if t == "text":
                events.append(("content_block_start", {"index": i, "content_block": {"type": "text", "text": ""}}))
                events.append(("content_block_delta", {"index": i, "delta": {"type": "text_delta",
                                                                              "text": block["text"]}}))
            elif t == "tool_use":
                events.append(("content_block_start", {"index": i, "content_block": dict(block, input={})}))
                events.append(("content_block_delta", {"index": i, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(block["input"])}}))
            elif t == "thinking":
                events.append(("content_block_start", {"index": i, "content_block": {
                    "type": "thinking", "thinking": "", "signature": ""}}))
                events.append(("content_block_delta", {"index": i, "delta": {"type": "thinking_delta",
                                                                              "thinking": block["thinking"]}}))
                events.append(("content_block_delta", {"index": i, "delta": {"type": "signature_delta",
                                                                              "signature": block["signature"]}}))
            events.append(("content_block_stop", {"index": i}))
        events.append(("message_delta", {"delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                                         "usage": {"output_tokens": message["usage"]["output_tokens"]}}))
        events.append(("message_stop", {}))
        return _sse((name, {"type": name, **data}) for name, data in events)

    @staticmethod
    def anthropic_error(err: ErrorTurn) -> dict:
        kind = {429: "rate_limit_error", 529: "overloaded_error", 500: "api_error", 401: "authentication_error",
                400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
                413: "request_too_large"}.get(err.status, "api_error")
        default = {"rate_limit_error": "Number of request tokens has exceeded your per-minute rate limit",
                   "overloaded_error": "Overloaded"}.get(kind, "Internal server error")
        return {"type": "error", "error": {"type": kind, "message": err.message or default},
                "request_id": "req_scripted"}


class _Handler(BaseHTTPRequestHandler):
    model_server: ModelServer
    protocol_version = "HTTP/1.1"
    server_version = "scripted-model-server/1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                data += self.rfile.read(size)
                self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("content-length") or 0))
        enc = self.headers.get("content-encoding", "").lower()
        if enc == "gzip":
            data = gzip.decompress(data)
        elif enc == "deflate":
            data = zlib.decompress(data)
        elif enc == "zstd":
            try:
                from compression import zstd  # Python 3.14+
                data = zstd.decompress(data)
            except ImportError:
                self.model_server.errors.append("a zstd-compressed request body (not decodable here)")
        return data

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.send_header("request-id", "req_scripted")
        self.send_header("x-request-id", "req_scripted")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _record(self, body, protocol: str, main: bool, turn: int | None, status: int = 200) -> Request:
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request(self.command, self.path, headers, body, protocol, main, turn, status)
        with self.model_server._lock:
            self.model_server.requests.append(req)
        return req

    def do_HEAD(self) -> None:
        self._record(None, "other", False, None)
        self._send(200, b"")

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/v1/models":
            self._record(None, "other", False, None)
            self._json(200, {"object": "list", "data": [], "models": []})
            return
        self._record(None, "other", False, None, 404)
        self._json(404, {"error": {"message": f"no route {path}", "type": "not_found"}})

    def do_POST(self) -> None:
        srv = self.model_server
        raw = self._read_body()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = raw.decode("utf-8", "replace")
        path = self.path.split("?")[0]
        if not isinstance(body, dict):
            srv.errors.append(f"{path}: a body that is not a JSON object")
            self._record(body, "other", False, None, 400)
            self._json(400, {"error": {"message": "expected a JSON object", "type": "invalid_request_error"}})
            return
        try:
            if path.endswith("/responses"):
                self._responses(body)
            elif path.endswith("/messages/count_tokens"):
                self._record(body, "anthropic", False, None)
                self._json(200, {"input_tokens": max(1, len(json.dumps(body)) // 4)})
            elif path.endswith("/messages"):
                self._messages(body)
            else:
                self._record(body, "other", False, None, 404)
                self._json(404, {"error": {"message": f"no route {path}", "type": "not_found"}})
        except Exception as e:  # a bug in the server must show in the test, not as a hung CLI
            srv.errors.append(f"{path}: {type(e).__name__}: {e}")
            self._json(500, {"error": {"message": f"model server bug: {e}", "type": "server_error"}})
            raise

    def _error(self, err: ErrorTurn, payload: dict) -> None:
        headers = {}
        if err.retry_after is not None:
            headers["retry-after"] = str(int(err.retry_after))
            headers["retry-after-ms"] = str(int(err.retry_after * 1000))
        self._json(err.status, payload, headers)

    def _disconnect(self, first_event: tuple[str, dict]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(_sse([first_event]))
        self.wfile.write(b'event: partial\ndata: {"type": "par')  # cut mid-event
        self.wfile.flush()
        self.close_connection = True

    def _responses(self, body: dict) -> None:
        srv = self.model_server
        main = bool(body.get("tools"))
        turn_no, turn = srv._next_turn() if main else (None, Turn(text=srv.final_text))
        if isinstance(turn, ErrorTurn):
            self._record(body, "openai", True, turn_no, 200 if turn.in_stream or turn.disconnect else turn.status)
            payload = srv.openai_error(turn)
            if turn.disconnect:
                resp = {"id": srv._id("resp"), "object": "response", "status": "in_progress", "output": []}
                self._disconnect(("response.created", {"type": "response.created", "response": resp}))
            elif turn.in_stream:
                rid = srv._id("resp")
                resp = {"id": rid, "object": "response", "status": "in_progress", "output": []}
                failed = dict(resp, status="failed", error={"code": payload["error"]["code"],
                                                             "message": payload["error"]["message"]})
                self._send(200, _sse([("response.created", {"type": "response.created", "response": resp}),
                                      ("response.failed", {"type": "response.failed", "response": failed})]),
                           "text/event-stream")
            else:
                self._error(turn, payload)
            return
        self._record(body, "openai", main, turn_no)
        if body.get("stream"):
            self._send(200, srv.openai_stream(turn, body), "text/event-stream", {"cache-control": "no-cache"})
        else:
            items = srv.openai_items(turn, body)
            self._json(200, {"id": srv._id("resp"), "object": "response", "status": "completed",
                             "model": body.get("model"), "output": items,
                             "usage": {"input_tokens": turn.input_tokens, "output_tokens": turn.output_tokens,
                                       "total_tokens": turn.input_tokens + turn.output_tokens}})

    def _messages(self, body: dict) -> None:
        srv = self.model_server
        main = bool(body.get("tools"))
        if main:
            turn_no, turn = srv._next_turn()
        else:  # a side query (title, topic, summary): a short answer that consumes no turn
            turn_no, turn = None, Turn(text="Scripted session", input_tokens=10, output_tokens=3)
        if isinstance(turn, ErrorTurn):
            self._record(body, "anthropic", True, turn_no, 200 if turn.in_stream or turn.disconnect else turn.status)
            payload = srv.anthropic_error(turn)
            start = {"id": srv._id("msg"), "type": "message", "role": "assistant", "model": body.get("model"),
                     "content": [], "stop_reason": None, "stop_sequence": None,
                     "usage": {"input_tokens": 1, "output_tokens": 1}}
            if turn.disconnect:
                self._disconnect(("message_start", {"type": "message_start", "message": start}))
            elif turn.in_stream:
                self._send(200, _sse([("message_start", {"type": "message_start", "message": start}),
                                      ("error", payload)]), "text/event-stream")
            else:
                self._error(turn, payload)
            return
        self._record(body, "anthropic", main, turn_no)
        message = srv.anthropic_message(turn, body, srv.anthropic_blocks(turn, body))
        if body.get("stream"):
            self._send(200, srv.anthropic_stream(message), "text/event-stream", {"cache-control": "no-cache"})
        else:
            self._json(200, message)


@pytest.fixture
def model_server():
    """A factory of started ModelServers, stopped at the end of the test."""
    servers: list[ModelServer] = []

    def start(script: Iterable = (), **kw) -> ModelServer:
        servers.append(ModelServer(script, **kw).start())
        return servers[-1]

    yield start
    for srv in servers:
        srv.stop()


# -- configuring the CLIs against a server ---------------------------------------------------------------
CODEX_MODEL = "gpt-5.5"  # a slug in codex-cli 0.171.0's bundled catalogue, so it offers its usual tools
CLAUDE_MODEL = "claude-sonnet-4-5"

QUIET_ENV = {  # nonessential traffic off: no telemetry, update checks, error reporting
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
    "NO_COLOR": "1",
}


def codex_config(server: ModelServer, model: str = CODEX_MODEL, *, retries: int = 0) -> str:
    """A CODEX_HOME/config.toml that points Codex at the server with its sandbox and approvals off."""
    return f"""\
model = "{model}"
model_provider = "scripted"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"
trace_exporter = "none"
metrics_exporter = "none"

[features]
plugins = false
remote_plugin = false
apps = false

[model_providers.scripted]
name = "scripted"
base_url = "{server.openai_base_url}"
wire_api = "responses"
env_key = "SCRIPTED_API_KEY"
request_max_retries = {retries}
stream_max_retries = {retries}
"""


def codex_env(codex_home: Path, server: ModelServer, *, model: str = CODEX_MODEL, retries: int = 0,
              home: Path | None = None, base: dict | None = None) -> dict[str, str]:
    """Write CODEX_HOME/config.toml and return the environment to run ``codex exec`` with (and, given
    ``home``, a HOME of its own: its shell tool runs ``bash -lc``, which reads the home's profile)."""
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(server, model, retries=retries))
    env = dict(os.environ if base is None else base)
    for k in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "CODEX_API_KEY"):
        env.pop(k, None)
    env.update(QUIET_ENV, CODEX_HOME=str(codex_home), SCRIPTED_API_KEY="fake-key", NO_PROXY="127.0.0.1",
               RUST_LOG="error")
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        env["HOME"] = str(home)
    return env


def claude_env(home: Path, server: ModelServer, *, max_retries: int | None = None,
               base: dict | None = None) -> dict[str, str]:
    """The environment to run ``claude -p`` with: its own HOME and config dir, the server, a fake key, and
    (``max_retries``) a cap on its retries of 429/529 (10 by default, with backoff)."""
    (home / ".claude").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if base is None else base)
    for k in list(env):
        if k.startswith(("ANTHROPIC_", "CLAUDE_CODE_", "CLAUDECODE")):
            env.pop(k)
    env.update(QUIET_ENV, HOME=str(home), CLAUDE_CONFIG_DIR=str(home / ".claude"),
               ANTHROPIC_BASE_URL=server.url, ANTHROPIC_API_KEY="fake-key", IS_SANDBOX="1",
               NO_PROXY="127.0.0.1")
    if max_retries is not None:
        env["CLAUDE_CODE_MAX_RETRIES"] = str(max_retries)
    return env
