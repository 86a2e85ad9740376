"""The coding-agent CLIs: `codex[:MODEL][,OPTION=VALUE...]` and `claude[:MODEL][,OPTION=VALUE...]`.

Options in the spec (they override `[agent]` in rloop.toml): `effort` (Codex: model_reasoning_effort,
e.g. low|medium|high; Claude Code: --effort, low|medium|high|xhigh|max), `max_tokens` and `max_usd` (the
run's spend cap: input plus output tokens, and dollars; `max_usd` only for Claude Code, since Codex
reports no cost). Claude Code reports usage per message as it goes, so its cap can end a session midway
(and `--max-budget-usd` is passed too); Codex reports usage once, when `codex exec` ends, so its cap is
checked at session boundaries, and a Codex session the daemon ends early (window, pause, timeout) records
no usage. The usage comes from the CLI's own stream: the CLI's, not the agent's commands' (rloopd reads it
from a socket they cannot reopen), but rloopd does not meter the provider itself.
`[agent]` also takes `args` (extra words for the CLI), `binary` (the CLI's path; default `codex`/`claude`
on the daemon's PATH) and `codex_config` (a table merged into Codex's configuration, e.g. a custom model
provider). Examples: `codex:gpt-5.5,effort=high`, `claude:claude-sonnet-4-5,max_usd=20`.

Each session runs the CLI non-interactively in the run directory, the prompt on its standard input:
- Codex: `codex exec --json --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox -C RUN_DIR -`
  (its own sandbox off: rloopd's is around it), configured with `-c` overrides only (approvals never,
  analytics, feedback, telemetry, update checks and plugin syncing off; see tests/model_server.py for what
  each of those otherwise reaches), `CODEX_HOME` in the run's own session HOME;
- Claude Code: `claude -p --output-format stream-json --verbose --dangerously-skip-permissions`
  (permissions off: rloopd's sandbox is the boundary; `IS_SANDBOX=1` lets it run so as root), its HOME and
  `CLAUDE_CONFIG_DIR` the run's own, nonessential traffic off, its Bash timeout above the budget.
The HOME is per run (sessions/<run>/home, removed when the run finishes): sessions of one run share it,
runs never do. Credentials come from the daemon's environment (the service's environment file):
`CODEX_API_KEY` (or the provider's `env_key`), `ANTHROPIC_API_KEY`; they are redacted from all output.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rloopd.agents.streams import PARSERS, StreamParser
from rloopd.errors import LabConfigError

KINDS = ("codex", "claude")
OPTIONS = {"effort": str, "max_tokens": int, "max_usd": float}
QUIET_ENV = {  # nonessential traffic off (Claude Code reads these; harmless for Codex)
    "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1", "DISABLE_BUG_COMMAND": "1", "NO_COLOR": "1",
}
CODEX_QUIET = {
    "approval_policy": "never", "sandbox_mode": "danger-full-access", "check_for_update_on_startup": False,
    "analytics": {"enabled": False}, "feedback": {"enabled": False},
    "otel": {"exporter": "none", "trace_exporter": "none", "metrics_exporter": "none"},
    "features": {"plugins": False, "remote_plugin": False, "apps": False},
}


@dataclass(frozen=True)
class CliAgent:
    kind: str  # codex | claude
    spec: str
    model: str | None = None
    effort: str | None = None
    max_tokens: int | None = None
    max_usd: float | None = None
    args: tuple[str, ...] = ()
    binary: str | None = None
    codex_config: str = "{}"  # JSON of the table merged into Codex's configuration

    @property
    def program(self) -> str:
        return self.binary or self.kind

    def command(self, run_dir: str, *, session_seconds: float, usd_left: float | None) -> list[str]:
        if self.kind == "codex":
            # a command it backgrounds may run as long as the session (`rloopd submit` waits for a whole
            # experiment); its shell tool yields and the model polls, so nothing kills the submit
            config = _merge(CODEX_QUIET | {"background_terminal_max_timeout": int(session_seconds * 1000)},
                            json.loads(self.codex_config))
            if self.effort:
                config["model_reasoning_effort"] = self.effort
            argv = [self.program, "exec", "--json", "--skip-git-repo-check", "--ephemeral",
                    "--dangerously-bypass-approvals-and-sandbox", "-C", run_dir]
            for key, value in _flatten(config):
                argv += ["-c", f"{key}={json.dumps(value)}"]
            if self.model:
                argv += ["-m", self.model]
            return [*argv, *self.args, "-"]
        argv = [self.program, "-p", "--output-format", "stream-json", "--verbose", "--dangerously-skip-permissions",
                "--no-session-persistence"]
        if self.model:
            argv += ["--model", self.model]
        if self.effort:
            argv += ["--effort", self.effort]
        if usd_left is not None:
            argv += ["--max-budget-usd", f"{max(usd_left, 0.0):.4f}"]
        return [*argv, *self.args]

    def environment(self, home: Path, *, session_seconds: float) -> dict[str, str]:
        """What the CLI needs on top of the session's environment (HOME is the session's already)."""
        env = dict(QUIET_ENV)
        if self.kind == "codex":
            (home / ".codex").mkdir(parents=True, exist_ok=True)
            env["CODEX_HOME"] = str(home / ".codex")
        else:
            (home / ".claude").mkdir(parents=True, exist_ok=True)
            env["CLAUDE_CONFIG_DIR"] = str(home / ".claude")
            # `rloopd submit` waits for a whole experiment, slot waits included: a command may take as long
            # as the session may (the default of 2 minutes would kill it)
            ms = str(int(session_seconds * 1000))
            env.update(BASH_DEFAULT_TIMEOUT_MS=ms, BASH_MAX_TIMEOUT_MS=ms)
        return env

    def parser(self) -> StreamParser:
        return PARSERS[self.kind]()

    @staticmethod
    def version(argv: list[str], env: dict[str, str], cwd: Path) -> str | None:
        """The first line the CLI prints for `--version` (recorded on session.started), or None. `argv` is
        the sandbox prefix and the binary: the binary is the lab's choice, so it never runs outside."""
        try:
            out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30, env=env,
                                 cwd=cwd, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            return None
        line = (out.stdout or out.stderr).strip().splitlines()
        return line[0][:200] if out.returncode == 0 and line else None

    def installed(self, path: str) -> str | None:
        """The CLI's resolved path on `path`, or None."""
        found = shutil.which(self.program, path=path)
        return str(Path(found).resolve()) if found else None


def parse_cli(spec: str, config: Any = None, where: str = "--agent") -> CliAgent:
    """`codex[:MODEL][,k=v...]` / `claude[...]` (with `[agent]` defaults) -> CliAgent, or LabConfigError."""
    m = re.fullmatch(r"(codex|claude)(?::([^,]*))?((?:,[^,]*)*)", spec)
    if m is None:
        raise LabConfigError(f"{where} {spec!r}: write codex[:MODEL][,OPTION=VALUE...] or claude[:MODEL][,...]")
    kind, model, rest = m.group(1), (m.group(2) or None), m.group(3)
    values: dict[str, Any] = {}
    if config is not None:
        values = {k: getattr(config, k) for k in OPTIONS if getattr(config, k, None) is not None}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in OPTIONS:
            raise LabConfigError(f"{where} {spec!r}: unknown option {item!r} (known: {', '.join(OPTIONS)})")
        try:
            values[key] = OPTIONS[key](float(value) if OPTIONS[key] is int else value)
        except ValueError:
            raise LabConfigError(f"{where} {spec!r}: {key}={value!r} is not a {OPTIONS[key].__name__}") from None
    for key in ("max_tokens", "max_usd"):
        if values.get(key) is not None and values[key] <= 0:
            raise LabConfigError(f"{where} {spec!r}: {key} must be positive")
    if kind == "codex" and values.get("max_usd") is not None:
        raise LabConfigError(f"{where} {spec!r}: max_usd: codex reports no cost, so a money cap could never "
                             f"bind; cap its tokens with max_tokens")
    return CliAgent(kind, spec, model=model, effort=values.get("effort"), max_tokens=values.get("max_tokens"),
                    max_usd=values.get("max_usd"), args=tuple(getattr(config, "args", ()) or ()),
                    binary=getattr(config, "binary", None),
                    codex_config=json.dumps(getattr(config, "codex_config", {}) or {}, sort_keys=True))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flatten(table: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys for `codex -c key=value` (a value is TOML; JSON scalars and arrays are valid TOML)."""
    out = []
    for k, v in sorted(table.items()):
        key = f"{prefix}{k}" if re.fullmatch(r"[A-Za-z0-9_-]+", k) else f'{prefix}"{k}"'
        if isinstance(v, dict):
            out += _flatten(v, key + ".")
        else:
            out.append((key, v))
    return out
