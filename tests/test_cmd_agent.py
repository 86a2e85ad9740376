"""Command-agent specs and session prompts: placeholders are checked before a run starts."""

from __future__ import annotations

import pytest

from rloopd.agents.cmd import DEFAULT_PROMPT, check_template, parse_cmd, render_prompt
from rloopd.errors import LabConfigError


def test_a_spec_is_split_like_a_shell_line_and_filled_per_session():
    agent = parse_cmd("cmd:'./my agent.sh' {prompt_file} --dir={run_dir} -s {session}")
    assert agent.command("/tmp/p.md", "/runs/a", 3) == ["./my agent.sh", "/tmp/p.md", "--dir=/runs/a", "-s", "3"]


@pytest.mark.parametrize("spec, words", [
    ("cmd:./a.sh {prompt}", "unknown placeholder {prompt}"),
    ("cmd:", "the command is empty"),
    ("cmd:'unclosed", "cannot split the command"),
    ("cmd:./a.sh {session", "write a literal brace"),
    ("shell:./a.sh", "cmd:'COMMAND ...'"),
])
def test_bad_specs_name_the_problem(spec, words):
    with pytest.raises(LabConfigError, match="--agent") as e:
        parse_cmd(spec)
    assert words in str(e.value)


def test_the_prompt_carries_program_results_notes_and_time():
    check_template(DEFAULT_PROMPT, "prompt.md")
    text = render_prompt(DEFAULT_PROMPT, program="# Make it fast", results="step\tval_bpb\n0\t2.0\n", notes="",
                         session=2, window_left=90.0, budget="steps:200")
    assert "session 2" in text and "# Make it fast" in text and "0\t2.0" in text
    assert "(none yet)" in text and "1.5 minutes" in text and "200 steps" in text
    assert "{" not in text  # every placeholder filled


def test_a_template_with_an_unknown_placeholder_is_refused():
    with pytest.raises(LabConfigError, match=r"lab/prompt.md: unknown placeholder \{history\}"):
        check_template("Here: {history}", "lab/prompt.md")
    check_template("literal {{braces}} and {program}", "lab/prompt.md")
