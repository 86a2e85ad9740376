"""Agents: the built-in policies (random) and command-line coding agents (`cmd:`)."""

from __future__ import annotations


def check_agent(spec: str) -> str:
    """The kind of agent a spec names (`random` or `cmd`); LabConfigError naming what is wrong with it."""
    from rloopd.agents.cmd import parse_cmd
    from rloopd.agents.random_search import parse_agent

    if spec.startswith("cmd:"):
        parse_cmd(spec)
        return "cmd"
    parse_agent(spec)
    return "random"
