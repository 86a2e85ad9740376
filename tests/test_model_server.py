"""The scripted model server (tests/model_server.py), alone and against the real pinned CLIs.

The CLIs come from tests/agents/ (``npm ci --prefix tests/agents``, which .ci/run does); without them these
tests skip on a laptop and fail in CI.  What the CLIs printed in these runs, for whoever parses the streams:

codex exec --json (codex-cli 0.171.0), one JSON object a line:
    {"type":"thread.started","thread_id":"01a2..."}
    {"type":"turn.started"}
    {"type":"item.completed","item":{"id":"item_0","type":"reasoning","text":"Look at the program first."}}
    {"type":"item.started","item":{"id":"item_1","type":"command_execution",
        "command":"/bin/bash -lc \\"cat 'program.md'\\"","aggregated_output":"","exit_code":null,
        "status":"in_progress"}}
    {"type":"item.completed","item":{..."type":"command_execution",...,"aggregated_output":"# Program...",
        "exit_code":0,"status":"completed"}}          (a failing command: "exit_code":3,"status":"failed")
    {"type":"item.completed","item":{"id":"item_2","type":"agent_message","text":"Raising the learning rate."}}
    {"type":"item.started"/"item.completed","item":{"id":"item_3","type":"file_change",
        "changes":[{"path":"/abs/run/train.py","kind":"update"}],"status":"completed"}}   (kind "add" for new files)
    {"type":"turn.completed","usage":{"input_tokens":4000,"cached_input_tokens":0,"cache_write_input_tokens":0,
        "output_tokens":200,"reasoning_output_tokens":10}}      (summed over the turn's model requests)
    provider errors: {"type":"error","message":"Reconnecting... 1/2 (exceeded retry limit, last status: 429 Too
        Many Requests, request id: ...)"} while it retries; when it gives up {"type":"error",...} then
        {"type":"turn.failed","error":{"message":"exceeded retry limit, last status: 429 ..."}} and exit status 1.
        The provider's stream_max_retries governs those visible retries (429, 5xx, in-stream response.failed,
        a dropped stream); request_max_retries adds silent HTTP-level retries of 5xx only (not 429).  Messages
        seen: "unexpected status 529 <unknown status code>: <message>, url: ..., request id: ...";
        for 500 "We're currently experiencing high demand, which may cause temporary errors.";
        "stream disconnected before completion: <message>" for response.failed and dropped streams.
    Commands carry no duration.  The model's own warnings (unknown model metadata) come as item type "error".

claude -p --output-format stream-json --verbose (Claude Code 2.1.197):
    {"type":"system","subtype":"init","cwd":...,"session_id":...,"tools":["Task","Bash",...,"Write"],
        "model":"claude-sonnet-4-5","permissionMode":"bypassPermissions","apiKeySource":"ANTHROPIC_API_KEY",
        "claude_code_version":"2.1.197",...}
    {"type":"system","subtype":"thinking_tokens",...}                          (when a thinking block streams)
    {"type":"assistant","message":{"id":"msg_..","content":[ONE block: thinking | text | tool_use],
        "usage":{...}},"session_id":...}   one line PER CONTENT BLOCK, same message.id; usage there is partial
    {"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":..,"content":"submitted",
        "is_error":false}]},"tool_use_result":{"stdout":"submitted","stderr":"","interrupted":false,...}}
        (Bash failure: "content":"Exit code 3\\noops","is_error":true, "tool_use_result":"Error: Exit code 3\\noops";
         Edit: tool_use_result has filePath, oldString, newString, structuredPatch; Write: type "create")
    {"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":..,"error_status":529,
        "error":"overloaded"}                                                     (while it retries 429/529/401)
    {"type":"result","subtype":"success","is_error":false,"num_turns":6,"result":"<last text>",
        "duration_ms":..,"duration_api_ms":..,"total_cost_usd":0.015,"usage":{"input_tokens":4000,
        "output_tokens":200,...},"modelUsage":{"claude-sonnet-4-5":{"inputTokens":..,"costUSD":..}},
        "permission_denials":[],...}
    When it gives up on provider errors: an assistant line with model "<synthetic>" and text "API Error: 529
    Overloaded...", then result with "subtype":"success" but "is_error":true and "api_error_status":529; exit 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .conftest import need_tool
from .model_server import (
    CLAUDE_MODEL,
    ErrorTurn,
    ModelServer,
    Turn,
    claude_env,
    codex_env,
    model_server,  # noqa: F401  (the fixture)
)

AGENTS_BIN = Path(__file__).parent / "agents" / "node_modules" / ".bin"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_cli(name: str) -> str:
    """The pinned CLI's path; skip without it on a laptop, fail in CI (where .ci/run installs it)."""
    path = AGENTS_BIN / name
    if not os.access(path, os.X_OK):
        msg = f"{name} is not installed in {AGENTS_BIN} (run: npm ci --prefix tests/agents)"
        if IN_CI:
            pytest.fail(msg + ", but CI=true: .ci/run must install it")
        pytest.skip(msg)
    return str(path)


# -- the server alone ----------------------------------------------------------------------------------
def post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json",
                                                                   **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def sse_events(data: bytes) -> list[dict]:
    events = []
    for chunk in data.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines() if ": " in line)
        if "data" in lines:
            event = json.loads(lines["data"])
            assert event["type"] == lines["event"]
            events.append(event)
    return events


SCRIPT = [
    Turn([("read", "program.md")], reasoning="Look at the program first."),
    Turn([("edit", "train.py", "LR = 0.1", "LR = 0.2")], text="Raising the learning rate."),
    Turn([("shell", "echo submitted"), ("write", "notes.md", "tried LR 0.2\n")]),
    Turn(text="Done: LR 0.2 submitted."),
]


def test_responses_protocol():
    tools = [{"type": "function", "name": "exec_command"}, {"type": "custom", "name": "apply_patch"}]
    with ModelServer(SCRIPT, cwd="/run") as srv:
        status, _, data = post(srv.openai_base_url + "/responses", {"model": "m", "stream": True, "tools": tools,
                                                                   "input": []})
        assert status == 200
        events = sse_events(data)
        types = [e["type"] for e in events]
        assert types[0] == "response.created" and types[-1] == "response.completed"
        done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
        assert [i["type"] for i in done] == ["reasoning", "function_call"]
        assert done[1]["name"] == "exec_command" and json.loads(done[1]["arguments"])["cmd"] == "cat 'program.md'"
        assert events[-1]["response"]["usage"]["input_tokens"] == 1000
        # a request without tools (a side request) does not consume a turn
        _, _, data = post(srv.openai_base_url + "/responses", {"model": "m", "stream": True, "input": []})
        assert sse_events(data)[-1]["type"] == "response.completed"
        _, _, data = post(srv.openai_base_url + "/responses", {"model": "m", "stream": True, "tools": tools})
        done = [e["item"] for e in sse_events(data) if e["type"] == "response.output_item.done"]
        assert [(i["type"], i["name"]) for i in done[:1]] == [("custom_tool_call", "apply_patch")]
        assert done[0]["input"] == ("*** Begin Patch\n*** Update File: train.py\n@@\n-LR = 0.1\n+LR = 0.2\n"
                                    "*** End Patch\n")
        assert done[1]["content"][0]["text"] == "Raising the learning rate."
        assert [r.turn for r in srv.requests] == [0, None, 1] and srv.turns_played == 2
    assert not srv.errors


def test_messages_protocol():
    with ModelServer(SCRIPT, cwd="/run") as srv:
        req = urllib.request.Request(srv.url + "/", method="HEAD")
        assert urllib.request.urlopen(req, timeout=10).status == 200
        url = srv.url + "/v1/messages?beta=true"
        status, _, data = post(url, {"model": "m", "stream": True, "tools": [{"name": "Read"}], "messages": []})
        assert status == 200
        events = sse_events(data)
        assert [e["type"] for e in events][:2] == ["message_start", "ping"]
        assert [e["type"] for e in events][-2:] == ["message_delta", "message_stop"]
        starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
        assert [b["type"] for b in starts] == ["thinking", "tool_use"]
        assert starts[1]["name"] == "Read"
        deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
        assert json.loads(deltas[-1]["partial_json"]) == {"file_path": "/run/program.md"}
        assert events[-2]["delta"]["stop_reason"] == "tool_use"
        # side requests: token counting and a tool-less quick query consume no turn
        status, _, data = post(srv.url + "/v1/messages/count_tokens", {"model": "m", "messages": []})
        assert status == 200 and json.loads(data)["input_tokens"] > 0
        status, _, data = post(url, {"model": "m", "messages": [{"role": "user", "content": "title?"}]})
        assert json.loads(data)["content"][0]["type"] == "text"
        # the first edit of a file reads it first (Claude Code refuses to edit a file it has not read)
        _, _, data = post(url, {"model": "m", "stream": True, "tools": [{"name": "Edit"}], "messages": []})
        starts = [e["content_block"] for e in sse_events(data) if e["type"] == "content_block_start"]
        assert [(b["type"], b.get("name")) for b in starts] == [("tool_use", "Read"), ("tool_use", "Edit"),
                                                                ("text", None)]
        assert [r.turn for r in srv.requests] == [None, 0, None, None, 1]
    assert not srv.errors


def test_error_turns_and_end_of_script():
    script = [ErrorTurn(429), ErrorTurn(529), ErrorTurn(500, in_stream=True), "only text"]
    with ModelServer(script + script) as srv:
        status, headers, data = post(srv.openai_base_url + "/responses", {"stream": True, "tools": [{}]})
        assert status == 429 and headers["retry-after"] == "0"
        assert json.loads(data)["error"]["code"] == "rate_limit_exceeded"
        status, _, data = post(srv.openai_base_url + "/responses", {"stream": True, "tools": [{}]})
        assert status == 529 and json.loads(data)["error"]["type"] == "server_error"
        status, _, data = post(srv.openai_base_url + "/responses", {"stream": True, "tools": [{}]})
        assert status == 200 and sse_events(data)[-1]["type"] == "response.failed"
        _, _, data = post(srv.openai_base_url + "/responses", {"stream": True, "tools": [{}]})
        assert sse_events(data)[-1]["response"]["output"][0]["content"][0]["text"] == "only text"
        url = srv.url + "/v1/messages"
        status, _, data = post(url, {"stream": True, "tools": [{}]})
        assert status == 429 and json.loads(data) == {
            "type": "error", "request_id": "req_scripted", "error": {
                "type": "rate_limit_error",
                "message": "Number of request tokens has exceeded your per-minute rate limit"}}
        status, _, data = post(url, {"stream": True, "tools": [{}]})
        assert status == 529 and json.loads(data)["error"] == {"type": "overloaded_error", "message": "Overloaded"}
        status, _, data = post(url, {"stream": True, "tools": [{}]})
        assert status == 200 and sse_events(data)[-1] == {"type": "error", "request_id": "req_scripted",
                                                           "error": {"type": "api_error",
                                                                     "message": "Internal server error"}}
        post(url, {"stream": True, "tools": [{}]})
        # past the end of the script: a final message, no tools
        _, _, data = post(url, {"stream": True, "tools": [{}]})
        events = sse_events(data)
        assert events[-2]["delta"]["stop_reason"] == "end_turn"
        assert events[3]["delta"]["text"] == srv.final_text
        assert [r.status for r in srv.main_requests()] == [429, 529, 200, 200, 429, 529, 200, 200, 200]
        assert [r.turn for r in srv.main_requests()] == [0, 1, 2, 3, 4, 5, 6, 7, None]


def test_disconnect_turn_cuts_the_stream(model_server):  # noqa: F811
    srv = model_server([ErrorTurn(disconnect=True), ErrorTurn(disconnect=True)])
    _, _, data = post(srv.url + "/v1/messages", {"stream": True, "tools": [{}]})
    assert data.startswith(b"event: message_start\n") and not data.endswith(b"\n\n")
    _, _, data = post(srv.openai_base_url + "/responses", {"stream": True, "tools": [{}]})
    assert data.startswith(b"event: response.created\n") and not data.endswith(b"\n\n")


# -- the real CLIs ----------------------------------------------------------------------------------------
@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "program.md").write_text("# Program\nTry a larger learning rate, submit, and leave a note.\n")
    (run / "train.py").write_text("LR = 0.1\nprint('loss', 1.0 / LR)\n")
    return run


def run_cli(cmd: list[str], cwd: Path, env: dict) -> tuple[subprocess.CompletedProcess, list[dict], float]:
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=90)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, lines, time.monotonic() - started


def codex_cmd(run: Path, prompt: str) -> list[str]:
    return [need_cli("codex"), "exec", "--json", "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox", "-C", str(run), prompt]


def claude_cmd(prompt: str) -> list[str]:
    return [need_cli("claude"), "-p", prompt, "--output-format", "stream-json", "--verbose",
            "--dangerously-skip-permissions", "--model", CLAUDE_MODEL]


def assert_session_did_the_work(run: Path, srv: ModelServer) -> None:
    assert (run / "train.py").read_text().startswith("LR = 0.2\n")
    assert (run / "notes.md").read_text() == "tried LR 0.2\n"
    outputs = [o.get("output") or "" for o in srv.tool_outputs().values()]
    assert any("Raise" in o or "larger learning rate" in o for o in outputs)  # program.md was read back
    assert any("submitted" in o for o in outputs)  # the command's output went back to the model
    assert srv.turns_played == len(SCRIPT) and not srv.errors


@pytest.mark.timeout(120)
def test_codex_plays_the_script(run_dir: Path, tmp_path: Path):
    cmd = codex_cmd(run_dir, "Follow program.md.")
    with ModelServer(SCRIPT, cwd=run_dir) as srv:
        env = codex_env(tmp_path / "codex_home", srv, home=tmp_path / "home")
        proc, events, secs = run_cli(cmd, run_dir, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert secs < 60
    assert_session_did_the_work(run_dir, srv)
    main = srv.main_requests()
    assert {t.get("name") for t in main[0].body["tools"]} >= {"exec_command", "apply_patch"}
    assert main[0].headers["authorization"] == "Bearer fake-key"

    types = [e["type"] for e in events]
    assert types[:2] == ["thread.started", "turn.started"] and types[-1] == "turn.completed"
    items = [e["item"] for e in events if e["type"] == "item.completed"]
    commands = [i for i in items if i["type"] == "command_execution"]
    assert [(c["exit_code"], c["status"]) for c in commands] == [(0, "completed"), (0, "completed")]
    assert "program.md" in commands[0]["command"] and "larger learning rate" in commands[0]["aggregated_output"]
    assert commands[1]["aggregated_output"] == "submitted\n"
    changes = [(Path(c["path"]).name, c["kind"]) for i in items if i["type"] == "file_change" for c in i["changes"]]
    assert changes == [("train.py", "update"), ("notes.md", "add")]
    assert [i["text"] for i in items if i["type"] == "agent_message"] == ["Raising the learning rate.",
                                                                            "Done: LR 0.2 submitted."]
    assert [i["text"] for i in items if i["type"] == "reasoning"] == ["Look at the program first."]
    usage = events[-1]["usage"]
    assert usage["input_tokens"] == 4000 and usage["output_tokens"] == 200


@pytest.mark.timeout(120)
def test_claude_plays_the_script(run_dir: Path, tmp_path: Path):
    cmd = claude_cmd("Follow program.md.")
    with ModelServer(SCRIPT, cwd=run_dir) as srv:
        env = claude_env(tmp_path / "home", srv)
        proc, events, secs = run_cli(cmd, run_dir, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert secs < 60
    assert_session_did_the_work(run_dir, srv)
    main = srv.main_requests()
    assert {t["name"] for t in main[0].body["tools"]} >= {"Bash", "Read", "Edit", "Write"}
    assert main[0].headers["x-api-key"] == "fake-key"

    assert (events[0]["type"], events[0]["subtype"]) == ("system", "init")
    assert events[0]["permissionMode"] == "bypassPermissions" and events[0]["cwd"] == str(run_dir)
    uses = [b for e in events if e["type"] == "assistant" for b in e["message"]["content"] if b["type"] == "tool_use"]
    assert [u["name"] for u in uses] == ["Read", "Read", "Edit", "Bash", "Write"]
    results = {b["tool_use_id"]: b for e in events if e["type"] == "user" for b in e["message"]["content"]
               if isinstance(b, dict) and b.get("type") == "tool_result"}
    assert set(results) == {u["id"] for u in uses} and not any(r.get("is_error") for r in results.values())
    bash = next(u for u in uses if u["name"] == "Bash")
    assert results[bash["id"]]["content"] == "submitted"
    texts = [b["text"] for e in events if e["type"] == "assistant" for b in e["message"]["content"]
             if b["type"] == "text"]
    assert texts == ["Raising the learning rate.", "Done: LR 0.2 submitted."]
    result = events[-1]
    assert result["type"] == "result" and result["subtype"] == "success" and not result["is_error"]
    assert result["result"] == "Done: LR 0.2 submitted."
    assert result["usage"]["input_tokens"] == 4000 and result["usage"]["output_tokens"] == 200
    assert result["total_cost_usd"] > 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cli", ["codex", "claude"])
def test_cli_retries_a_provider_error_then_reports_a_failed_command(cli: str, run_dir: Path, tmp_path: Path):
    script = [ErrorTurn(429 if cli == "codex" else 529), Turn([("shell", "echo oops >&2; exit 3")]), "Gave up."]
    with ModelServer(script, cwd=run_dir) as srv:
        if cli == "codex":
            env = codex_env(tmp_path / "codex_home", srv, home=tmp_path / "home", retries=2)
            proc, events, secs = run_cli(codex_cmd(run_dir, "Go."), run_dir, env)
        else:
            env = claude_env(tmp_path / "home", srv)
            proc, events, secs = run_cli(claude_cmd("Go."), run_dir, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert secs < 60
    assert [r.status for r in srv.main_requests()] == [429 if cli == "codex" else 529, 200, 200]
    sent_back = next(iter(srv.tool_outputs().values()))["output"]
    assert ("Process exited with code 3" if cli == "codex" else "Exit code 3") in sent_back
    if cli == "codex":
        assert any(e["type"] == "error" and "429" in e["message"] for e in events)
        cmd = next(e["item"] for e in events if e["type"] == "item.completed"
                   and e["item"]["type"] == "command_execution")
        assert (cmd["exit_code"], cmd["status"], cmd["aggregated_output"]) == (3, "failed", "oops\n")
    else:
        retry = next(e for e in events if e.get("subtype") == "api_retry")
        assert (retry["error_status"], retry["error"]) == (529, "overloaded")
        result = next(b for e in events if e["type"] == "user" for b in e["message"]["content"]
                      if isinstance(b, dict) and b.get("type") == "tool_result")
        assert result["is_error"] and result["content"] == "Exit code 3\noops"
    assert not srv.errors


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cli", ["codex", "claude"])
def test_cli_connects_only_to_loopback(cli: str, run_dir: Path, tmp_path: Path):
    """Nonessential traffic is off: every socket the CLI opens (strace) goes to 127.0.0.1 or a local socket."""
    strace = need_tool("strace")
    trace = tmp_path / "strace.txt"
    with ModelServer(SCRIPT, cwd=run_dir) as srv:
        if cli == "codex":
            env = codex_env(tmp_path / "codex_home", srv, home=tmp_path / "home")
            cmd = codex_cmd(run_dir, "Follow program.md.")
        else:
            env = claude_env(tmp_path / "home", srv)
            cmd = claude_cmd("Follow program.md.")
        proc, _, _ = run_cli([strace, "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(trace), *cmd], run_dir, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert srv.turns_played == len(SCRIPT)
    remote = [line for line in trace.read_text().splitlines()
              if "AF_INET" in line and '"127.0.0.1"' not in line and '"::1"' not in line]
    assert remote == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cli", ["codex", "claude"])
def test_cli_gives_up_on_a_persistent_provider_error(cli: str, run_dir: Path, tmp_path: Path):
    with ModelServer([ErrorTurn(529)] * 6, cwd=run_dir) as srv:
        if cli == "codex":
            env = codex_env(tmp_path / "codex_home", srv, home=tmp_path / "home", retries=1)
            proc, events, _ = run_cli(codex_cmd(run_dir, "Go."), run_dir, env)
            assert events[-1]["type"] == "turn.failed" and "529" in events[-1]["error"]["message"]
        else:
            env = claude_env(tmp_path / "home", srv, max_retries=1)
            proc, events, _ = run_cli(claude_cmd("Go."), run_dir, env)
            assert events[-1]["type"] == "result" and events[-1]["is_error"]
            assert events[-1]["api_error_status"] == 529
    assert proc.returncode == 1
    # Codex: request_max_retries (5xx only, silent) inside stream_max_retries ("Reconnecting..."): 2 x 2 tries
    assert [r.status for r in srv.main_requests()] == [529] * (4 if cli == "codex" else 2)
