"""Agents: the built-in policies (random) and, later, coding-agent adapters."""
