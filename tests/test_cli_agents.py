"""Codex and Claude Code sessions, the real pinned CLIs (tests/agents/) against the scripted model server.

Each test makes a lab whose `[agent]` points the CLI at tests/model_server.py on 127.0.0.1 and runs a real
session in the real sandbox: the model's script reads program.md, edits train.py, runs `rloopd submit`,
writes a note and ends; the log must show the commands, the edits, the messages, the usage, the experiment
and its decision.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from rloopd import runs
from rloopd.history import run_state
from rloopd.loop import Loop

from .daemon_helpers import make_lab
from .model_server import CLAUDE_MODEL, CODEX_MODEL, ErrorTurn, ModelServer, Turn
from .test_model_server import need_cli

KEY = "sk-scripted-0123456789abcdefghij"  # a fake credential, passed as the daemon's environment would


def cli_lab(tmp_path: Path, kind: str, server: ModelServer, extra: str = "") -> Path:
    lab = make_lab(tmp_path)
    binary = need_cli(kind)
    with open(lab / "rloop.toml", "a") as f:
        f.write(f'\n[agent]\nbackoff = 0\ngrace = 1\nempty_cap = 1\nprovider_cap = 1\nsession_timeout = 120\n'
                f'binary = "{binary}"\n{extra}')
        if kind == "codex":
            f.write(f'[agent.codex_config]\nmodel_provider = "scripted"\n'
                    f'[agent.codex_config.model_providers.scripted]\nname = "scripted"\n'
                    f'base_url = "{server.openai_base_url}"\nwire_api = "responses"\nenv_key = "SCRIPTED_API_KEY"\n'
                    f'request_max_retries = 0\nstream_max_retries = 0\n')
        else:
            f.write(f'[agent.env]\nANTHROPIC_BASE_URL = "{server.url}"\nCLAUDE_CODE_MAX_RETRIES = "0"\n')
    return lab


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("SCRIPTED_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    for name in ("OPENAI_API_KEY", "CODEX_API_KEY", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def start(home, lab: Path, kind: str, model: str, n: int = 2) -> str:
    return runs.create_run(home, lab, agent=f"{kind}:{model}", experiments=n, budget=None, seed=0, name=None)


SCRIPT = [
    Turn([("shell", "cat program.md")], reasoning="Read the program first."),
    Turn([("edit", "workspace/train.py", "DEPTH = 2  # blocks", "DEPTH = 3  # blocks")],
         text="Trying a deeper model."),
    Turn([("shell", 'rloopd submit -m "depth 3: more capacity"')]),
    Turn([("write", "memory/notes.md", "depth 3 tried\n")]),
    Turn(text="Done for this session."),
]


def acts(home, run):
    return [e.data for e in home.log.read(run, types=["agent.acted"])]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,model", [("codex", CODEX_MODEL), ("claude", CLAUDE_MODEL)])
def test_a_cli_session_edits_submits_writes_a_note_and_is_recorded(home, tmp_path, keys, kind, model):
    with ModelServer(SCRIPT) as server:
        lab = cli_lab(tmp_path, kind, server)
        run = start(home, lab, kind, model, n=1)
        server.cwd = home.run_dir(run)  # Claude Code's file tools take absolute paths
        Loop(home, run).run()
    assert server.errors == []
    state = run_state(home.log, run)
    [submitted] = [e.data for e in home.log.read(run, types=["experiment.submitted"])]
    assert submitted["message"] == "depth 3: more capacity" and submitted["step"] == 1
    [decided] = [e.data for e in home.log.read(run, types=["experiment.decided"]) if e.data["step"] == 1]
    [started] = [e.data for e in home.log.read(run, types=["experiment.started"]) if e.data["step"] == 1]
    assert b"DEPTH = 3" in home.snapshots.read(started["commit"], "train.py")
    assert started["category"] == "depth"  # classified from the diff (daemon/categories.py)
    assert decided["accepted"] in (True, False)
    recorded = acts(home, run)
    kinds = {a["kind"] for a in recorded}
    assert {"command", "edit", "message"} <= kinds, recorded
    commands = [a["summary"] for a in recorded if a["kind"] == "command"]
    assert any("cat program.md" in c and "exit 0" in c for c in commands), commands
    assert any("rloopd submit" in c and "exit 0" in c for c in commands), commands
    assert any("train.py" in a["summary"] for a in recorded if a["kind"] == "edit")
    assert any("deeper model" in a["summary"] for a in recorded if a["kind"] == "message")
    # what the CLI did before it submitted is recorded before the submit
    order = [e.type for e in home.log.read(run, types=["agent.acted", "experiment.submitted"])]
    assert order.index("experiment.submitted") > 0
    notes = [e.data for e in home.log.read(run, types=["memory.written"]) if e.data["path"] == "notes.md"]
    assert notes and home.blobs.get(notes[-1]["blob"]) == b"depth 3 tried\n"
    [ended] = [e.data for e in home.log.read(run, types=["session.ended"])]
    assert ended["reason"] == "agent-exit" and ended["exit_code"] == 0
    [began] = [e.data for e in home.log.read(run, types=["session.started"])]
    assert ("0.171.0" if kind == "codex" else "2.1.197") in began["agent_version"]
    assert ended["usage"]["input"] > 0 and ended["usage"]["output"] > 0
    if kind == "claude":
        assert ended["cost_usd"] and ended["cost_usd"] > 0
    stream = home.blobs.get(ended["output_blob"]).decode()
    assert all(json.loads(line) for line in stream.splitlines() if line.strip())  # the raw JSON stream
    assert state.spent_tokens == ended["usage"]["input"] + ended["usage"]["output"]
    found = subprocess.run(["grep", "-r", "-l", KEY, str(home.path)], capture_output=True, text=True)
    assert found.stdout == ""  # the credential is nowhere in the home


def escapes(home_path: Path) -> list[Turn]:
    return [
        Turn([("shell", "echo owned >> frozen/experiment.py; echo frozen-exit=$?")]),
        Turn([("shell", f"head -c 16 {home_path}/events.db; echo read-exit=$?")]),
        Turn([("shell", f"ls {home_path}/runs {home_path}/blobs; echo list-exit=$?")]),
        Turn(text="I could not get out."),
    ]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,model", [("codex", CODEX_MODEL), ("claude", CLAUDE_MODEL)])
def test_a_cli_agent_cannot_edit_frozen_files_or_read_the_log(home, tmp_path, keys, kind, model):
    with ModelServer(escapes(home.path)) as server:
        lab = cli_lab(tmp_path, kind, server)
        run = start(home, lab, kind, model, n=1)
        server.cwd = home.run_dir(run)
        Loop(home, run).run()
    run_dir = home.run_dir(run)
    assert "owned" not in (run_dir / "frozen" / "experiment.py").read_text()
    commands = [a for a in acts(home, run) if a["kind"] == "command"]
    assert len(commands) >= 3, acts(home, run)
    details = [home.blobs.get(a["detail_blob"]).decode() for a in commands]
    assert "frozen-exit=0" not in details[0] and "frozen-exit=" in details[0]
    assert "read-exit=" in details[1] and "read-exit=0" not in details[1]
    assert "SQLite format" not in "".join(details)  # the event log's bytes never reached the agent
    assert "list-exit=" in details[2] and "list-exit=0" not in details[2]
    assert not [e for e in home.log.read(run, types=["integrity.violated"])]  # nothing got through


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,model", [("codex", CODEX_MODEL), ("claude", CLAUDE_MODEL)])
def test_a_provider_error_ends_the_session_as_such_and_is_not_a_restart(home, tmp_path, keys, kind, model):
    with ModelServer([ErrorTurn(529)] * 30) as server:
        lab = cli_lab(tmp_path, kind, server)
        run = start(home, lab, kind, model, n=1)
        Loop(home, run).run()
    [ended] = [e.data for e in home.log.read(run, types=["session.ended"])]
    assert ended["reason"] == "provider-error", ended
    state = run_state(home.log, run)
    assert state.restarts == 0 and state.status == "finished"
    [finished] = [e.data for e in home.log.read(run, types=["run.finished"])]
    assert finished["reason"] == "provider-error"
    assert any(a["kind"] == "error" for a in acts(home, run))


@pytest.mark.timeout(240)
def test_a_spend_cap_ends_the_run(home, tmp_path, keys):
    script = [Turn([("shell", "echo one")], input_tokens=5000), Turn([("shell", "echo two")], input_tokens=5000),
              Turn(text="done")]
    with ModelServer(script) as server:
        lab = cli_lab(tmp_path, "claude", server)
        run = runs.create_run(home, lab, agent=f"claude:{CLAUDE_MODEL},max_tokens=3000", experiments=3, budget=None,
                              seed=0, name=None)
        Loop(home, run).run()
    [ended] = [e.data for e in home.log.read(run, types=["session.ended"])]
    assert ended["reason"] == "spend-cap", ended
    [finished] = [e.data for e in home.log.read(run, types=["run.finished"])]
    assert finished["reason"] == "spend-cap"


def test_a_cli_that_is_not_installed_is_a_readable_reason(home, tmp_path, keys):
    lab = make_lab(tmp_path)
    with open(lab / "rloop.toml", "a") as f:
        f.write('\n[agent]\nbackoff = 0\nempty_cap = 1\nbinary = "/nonexistent/codex"\n')
    run = runs.create_run(home, lab, agent="codex:gpt-5.5", experiments=1, budget=None, seed=0, name=None)
    Loop(home, run).run()
    [ended] = [e.data for e in home.log.read(run, types=["session.ended"])]
    assert ended["reason"] == "error"
    assert "not installed" in home.blobs.get(ended["output_blob"]).decode()
    assert run_state(home.log, run).status == "finished"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,model", [("codex", CODEX_MODEL), ("claude", CLAUDE_MODEL)])
def test_a_refused_credential_is_an_error_in_plain_words_and_the_run_ends_cleanly(home, tmp_path, keys, kind,
                                                                                    model):
    with ModelServer([ErrorTurn(401, message="invalid x-api-key")] * 10) as server:
        lab = cli_lab(tmp_path, kind, server)
        run = start(home, lab, kind, model, n=1)
        Loop(home, run).run()
    [ended] = [e.data for e in home.log.read(run, types=["session.ended"])]
    assert ended["reason"] == "error" and ended["exit_code"] != 0, ended
    assert "refused the credentials" in home.blobs.get(ended["stderr_blob"]).decode()
    assert run_state(home.log, run).status == "finished"
    [finished] = [e.data for e in home.log.read(run, types=["run.finished"])]
    assert finished["reason"] == "empty-cap"  # a session that cannot work counts as empty: no spinning
