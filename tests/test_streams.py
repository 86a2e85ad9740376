"""The CLIs' JSON streams parsed line by line (lines as codex-cli 0.171.0 and Claude Code 2.1.197 print them;
tests/test_model_server.py lists where they were seen)."""

from __future__ import annotations

import json

from rloopd.agents.streams import ClaudeStream, CodexStream


def ticking(step: float = 1.5):
    """A clock that moves `step` seconds each time it is read."""
    now = [0.0]

    def clock() -> float:
        now[0] += step
        return now[0]
    return clock


def feed(parser, *events):
    acts = []
    for e in events:
        acts += parser.feed(json.dumps(e) if not isinstance(e, str) else e)
    return acts + parser.finish()


def test_codex_items_become_acts_and_usage_adds_up_over_turns():
    p = CodexStream()
    p.clock = ticking()
    acts = feed(p,
                {"type": "thread.started", "thread_id": "t"}, {"type": "turn.started"},
                {"type": "item.completed", "item": {"id": "0", "type": "reasoning", "text": "Look first."}},
                {"type": "item.started", "item": {"id": "1", "type": "command_execution", "status": "in_progress",
                                                  "command": "/usr/bin/bash -lc 'cat program.md'", "exit_code": None}},
                {"type": "item.completed", "item": {"id": "1", "type": "command_execution", "status": "completed",
                                                    "command": "/usr/bin/bash -lc 'cat program.md'", "exit_code": 0,
                                                    "aggregated_output": "# Program"}},
                {"type": "item.completed", "item": {"id": "2", "type": "file_change", "status": "completed",
                                                    "changes": [{"path": "/r/workspace/train.py", "kind": "update"}]}},
                {"type": "item.completed", "item": {"id": "3", "type": "agent_message", "text": "Deeper."}},
                {"type": "turn.completed", "usage": {"input_tokens": 4000, "cached_input_tokens": 1000,
                                                     "output_tokens": 200, "reasoning_output_tokens": 10}},
                {"type": "turn.completed", "usage": {"input_tokens": 100, "output_tokens": 5}})
    assert [(a.kind, a.summary) for a in acts] == [
        ("reasoning", "Look first."), ("command", "cat program.md -> exit 0 in 1.5 s"),
        ("edit", "update /r/workspace/train.py"), ("message", "Deeper.")]
    assert "# Program" in acts[1].detail
    assert p.usage == {"input": 4100, "cached_input": 1000, "output": 205, "reasoning": 10} and p.tokens == 4305
    assert p.failure is None and p.cost_usd is None


def test_codex_gives_up_on_a_rate_limit_as_a_provider_error_and_on_a_401_as_an_error():
    p = CodexStream()
    feed(p, {"type": "error", "message": "Reconnecting... 1/2 (exceeded retry limit, last status: 429 Too Many "
                                         "Requests, request id: x)"},
         {"type": "turn.failed", "error": {"message": "exceeded retry limit, last status: 429 Too Many Requests"}})
    assert p.failure == "provider-error" and p.retries == 1
    p = CodexStream()
    feed(p, {"type": "turn.failed", "error": {"message": "unexpected status 401 Unauthorized: invalid api key"}})
    assert p.failure == "error" and "401" in p.failure_detail


def test_claude_tool_calls_are_recorded_with_their_results_and_exit_codes():
    p = ClaudeStream()
    p.clock = ticking()
    acts = feed(p,
                {"type": "system", "subtype": "init", "model": "m", "tools": ["Bash"]},
                {"type": "assistant", "message": {"id": "m1", "content": [{"type": "text", "text": "Let me look."}],
                                                  "usage": {"input_tokens": 10, "output_tokens": 3}}},
                {"type": "assistant", "message": {"id": "m1", "content": [
                    {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "false"}}],
                    "usage": {"input_tokens": 10, "output_tokens": 9}}},
                {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t1",
                                                          "content": "Exit code 3\noops", "is_error": True}]}},
                {"type": "assistant", "message": {"id": "m2", "content": [
                    {"type": "tool_use", "id": "t2", "name": "Edit", "input": {"file_path": "/r/workspace/train.py"}},
                    {"type": "tool_use", "id": "t3", "name": "Bash", "input": {"command": "sleep 100"}}]}},
                {"type": "user", "message": {"content": [{"type": "tool_result", "tool_use_id": "t2",
                                                          "content": [{"type": "text", "text": "ok"}]}]}})
    assert [(a.kind, a.summary) for a in acts] == [
        ("message", "Let me look."), ("command", "false -> exit 3 in 1.5 s"), ("edit", "edit /r/workspace/train.py (ok)"),
        ("command", "sleep 100 -> exit None")]  # the last one never got its result: recorded at the end
    assert p.usage == {"input": 10, "output": 9}  # live, per message (the last partial usage of each)
    feed(p, {"type": "result", "subtype": "success", "is_error": False, "total_cost_usd": 0.02,
             "usage": {"input_tokens": 100, "cache_read_input_tokens": 50, "output_tokens": 20}})
    assert p.usage == {"input": 150, "cached_input": 50, "output": 20} and p.cost_usd == 0.02
    assert p.failure is None


def test_claude_giving_up_on_overload_is_a_provider_error():
    p = ClaudeStream()
    acts = feed(p, {"type": "system", "subtype": "api_retry", "attempt": 1, "max_retries": 2,
                    "error_status": 529, "error": "overloaded"},
                {"type": "result", "subtype": "success", "is_error": True, "api_error_status": 529,
                 "result": "API Error: 529 Overloaded"})
    assert p.failure == "provider-error" and p.retries == 1 and [a.kind for a in acts] == ["error", "error"]
    p = ClaudeStream()
    feed(p, {"type": "result", "subtype": "success", "is_error": True, "result": "Invalid API key · Please run /login"})
    assert p.failure == "error" and "Invalid API key" in p.failure_detail


def test_a_malformed_or_cut_line_is_recorded_and_skipped():
    p = ClaudeStream()
    acts = feed(p, "not json at all", '{"type": "assistant", "message": {"id": "m", "content": [{"type": "te',
                "[1, 2]", {"type": "assistant"},
                {"type": "assistant", "message": {"id": "m", "content": [{"type": "text", "text": "still here"}]}})
    assert [a.kind for a in acts] == ["error", "error", "error", "error", "message"]
    assert p.malformed == 4 and "unreadable stream line" in acts[0].summary and acts[1].detail.startswith('{"type"')


def test_hostile_lines_cannot_crash_the_parser_or_lower_the_usage():
    p = CodexStream()
    acts = feed(p, "[" * 200_000, {"type": "turn.completed", "usage": {"input_tokens": -999999999,
                                                                       "output_tokens": True}},
                {"type": "turn.completed", "usage": {"input_tokens": 7, "output_tokens": 3}})
    assert [a.kind for a in acts] == ["error"] and p.usage == {"input": 7, "output": 3}
    c = ClaudeStream()
    feed(c, {"type": "result", "usage": {"input_tokens": -5, "output_tokens": 2}, "total_cost_usd": -3})
    assert c.usage == {"input": 0, "output": 2} and c.cost_usd is None
