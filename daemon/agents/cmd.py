"""Command-line agents (`cmd:'COMMAND ...'`): the spec, its placeholders, and the prompt a session receives.

A spec such as `cmd:'./agent.sh {prompt_file} --session {session}'` is split like a shell line (no shell
runs it); `{prompt_file}` (the session's prompt, a file in the session's private directory), `{run_dir}`
(the run directory, also the session's cwd) and `{session}` (its number, from 1) are substituted in each
word. An unknown placeholder is an error that names it, before the run is created.

The prompt is rendered from the lab's template (`[agent] prompt`, default `prompt.md`, recorded in the
manifest like any lab file; a built-in template when the lab has none) with `{program}` (the run's current
program.md), `{results}` (results.tsv so far), `{notes}` (memory/notes.md), `{session}`, `{window_left}`,
`{budget}`, `{memory}` (what the run's memory policy shows and carries) and `{space}` (what the search space
lets the agent change). Braces meant literally are doubled (`{{`), as in Python's str.format.
"""

from __future__ import annotations

import shlex
import string
from dataclasses import dataclass
from pathlib import Path

from rloopd.errors import LabConfigError

COMMAND_FIELDS = ("prompt_file", "run_dir", "session")
PROMPT_FIELDS = ("program", "results", "notes", "session", "window_left", "budget", "memory", "space")

DEFAULT_PROMPT = """\
You are session {session} of an autonomous research run. Your working directory is the run directory.

# Program (program.md)

{program}

# Results so far (memory/results.tsv)

{results}

# Your notes from earlier sessions (memory/notes.md)

{notes}

# What you may change

{space}

# Memory

{memory}

# How to work

To run an experiment on the current workspace, run `rloopd submit -m "what you changed and why"`; it
waits for the result and prints it, and after a rejected change the workspace is back at the best
version. Each experiment trains for {budget}. Time left in this run's window: {window_left}. End the
session when you have nothing more to try.
"""


@dataclass(frozen=True)
class CmdAgent:
    spec: str
    argv: tuple[str, ...]

    def command(self, prompt_file: str, run_dir: str, session: int) -> list[str]:
        values = {"prompt_file": prompt_file, "run_dir": run_dir, "session": str(session)}
        return [word.format_map(values) for word in self.argv]


def fields_of(template: str, where: str) -> set[str]:
    """The placeholder names in a str.format template; a malformed one is an error naming `where`."""
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise LabConfigError(f"{where}: {e} (write a literal brace as {{{{ or }}}})") from None


def parse_cmd(spec: str, where: str = "--agent") -> CmdAgent:
    """`cmd:'COMMAND ...'` -> CmdAgent; LabConfigError naming the problem."""
    if not spec.startswith("cmd:"):
        raise LabConfigError(f"{where} {spec!r}: a command agent is written cmd:'COMMAND ...'")
    try:
        argv = tuple(shlex.split(spec[4:]))
    except ValueError as e:
        raise LabConfigError(f"{where} {spec!r}: cannot split the command: {e}") from None
    if not argv:
        raise LabConfigError(f"{where} {spec!r}: the command is empty")
    for word in argv:
        for name in fields_of(word, f"{where} {spec!r}"):
            if name not in COMMAND_FIELDS:
                raise LabConfigError(f"{where} {spec!r}: unknown placeholder {{{name}}} "
                                     f"(known: {', '.join('{' + f + '}' for f in COMMAND_FIELDS)})")
    return CmdAgent(spec, argv)


def program_in_lab(spec: str, lab_root: Path) -> str | None:
    """The agent's program as a path relative to the lab, when it is a file of the lab (`./agent.sh`, or an
    absolute path inside the lab): such a script is recorded at creation and run from its blob, so a
    session runs what the log says and not whatever the lab directory holds by then. A program found on
    PATH (`codex`, `python3`) is the machine's, not the lab's, and is not recorded."""
    word = parse_cmd(spec).argv[0]
    if "/" not in word or "{" in word:
        return None
    root = Path(lab_root).resolve()
    path = (root / word).resolve()
    if not path.is_file():
        return None
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


def check_template(template: str, where: str) -> None:
    for name in fields_of(template, where):
        if name not in PROMPT_FIELDS:
            raise LabConfigError(f"{where}: unknown placeholder {{{name}}} "
                                 f"(known: {', '.join('{' + f + '}' for f in PROMPT_FIELDS)})")


def render_prompt(template: str, *, program: str, results: str, notes: str, session: int,
                  window_left: float | None, budget: str, memory: str = "", space: str = "") -> str:
    left = "unlimited" if window_left is None else f"{max(window_left, 0) / 60:.1f} minutes"
    budget_text = f"{budget.split(':', 1)[1]} steps" if budget.startswith("steps:") else f"{budget} seconds"
    return template.format_map({"program": program, "results": results or "(not shown in this run)",
                                "notes": notes.strip() or "(none yet)", "session": session, "window_left": left,
                                "budget": budget_text, "memory": memory, "space": space})
