"""Agents: the built-in policies (random, optuna), command-line agents (`cmd:`) and the coding-agent CLIs
(`codex`, `claude`). All but the built-in policies work in sessions (daemon/sessions.py)."""

from __future__ import annotations

SESSION_KINDS = ("cmd", "codex", "claude")


def check_agent(spec: str) -> str:
    """The kind of agent a spec names (`random`, `optuna`, `cmd`, `codex` or `claude`); LabConfigError naming
    what is wrong with it."""
    from rloopd.agents.cli import parse_cli
    from rloopd.agents.cmd import parse_cmd
    from rloopd.agents.random_search import parse_agent

    if spec.startswith("cmd:"):
        parse_cmd(spec)
        return "cmd"
    if spec.split(":", 1)[0].split(",", 1)[0] in ("codex", "claude"):
        return parse_cli(spec).kind
    if spec.split(":", 1)[0] == "optuna":
        from rloopd.agents.optuna_agent import parse_agent as parse_optuna

        parse_optuna(spec)
        return "optuna"
    parse_agent(spec)
    return "random"
