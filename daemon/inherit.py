"""Memory policies at a run's creation: `notes`, `none`, `results-only` and `from:RUN[@STEP]`.

What each policy shows a session is in `rloopd.memory.rundir.policy_kind`. `from:RUN[@STEP]` starts a new run
with another run's memory (notes.md, artifacts/, its best checkpoint) as that run's history folded to the end
of STEP (the position a fork at STEP would continue from), or to its latest event. The files and the
checkpoint are recorded on the new run's `run.created` (`memory_from`, with the chain of runs the knowledge
passed through), so the new run's memory is a fold of its own log: replay, fork and export need nothing of
the source. The source's results are not carried (the new run has its own); its workspace is not either
(the new run starts from its lab's base, as any run); its checkpoint only when both labs have the same name
(a model of another lab may not load).
"""

from __future__ import annotations

import re
from typing import Any

from rloopd.errors import LabConfigError, StepNotFound, StreamNotFound
from rloopd.home import Home
from rloopd.lab import Lab
from rloopd.memory.folded import fold_history
from rloopd.memory.rundir import policy_kind

SIMPLE = ("notes", "none", "results-only")


def resolve_memory(home: Home, policy: str | None, lab: Lab, key: str = "--memory") -> tuple[str, dict | None]:
    """(the policy as recorded, `memory_from` or None). A bad policy, an unknown run, a step that has not
    finished, or a source whose artifacts are over this lab's cap raise LabConfigError naming `key`."""
    policy = (policy or "notes").strip()
    if policy in SIMPLE:
        return policy, None
    m = re.fullmatch(r"from:([^@\s]+)(?:@(.*))?", policy)
    if not m:
        raise LabConfigError(f"{key} {policy!r}: use notes, none, results-only or from:RUN[@STEP]")
    ref, step_text = m.group(1), m.group(2)
    step = None
    if step_text is not None:
        if not re.fullmatch(r"\d+", step_text):
            raise LabConfigError(f"{key} {policy!r}: the step after @ must be a whole number, got {step_text!r}")
        step = int(step_text)
    try:
        if ref == "home" or ref.startswith("batch:"):
            raise StreamNotFound(f"{ref!r} is not a run")
        source = home.log.resolve(ref)
    except StreamNotFound as e:
        raise LabConfigError(f"{key} {policy}: {e}") from None
    from rloopd.fork import fork_point

    if step is None:
        stream, n = source, home.log.head(source)[0]
    else:
        try:
            stream, n = fork_point(home, source, step)
        except StepNotFound as e:
            raise LabConfigError(f"{key} {policy}: {e}") from None
    fold = fold_history(home.log, stream, n)
    mem = fold.mem
    files = sorted(mem.visible.items())
    artifacts = sum(home.blobs.path(blob).stat().st_size for path, blob in files if path.startswith("artifacts/"))
    cap = lab.agent.artifacts_mb * (1 << 20)
    if artifacts > cap:
        raise LabConfigError(f"{key} {policy}: run {source}'s memory/artifacts/ holds {artifacts / (1 << 20):.1f} MB, "
                             f"over this lab's cap of {lab.agent.artifacts_mb:g} MB ([agent] artifacts_mb)")
    created = next(home.log.read(source, until_n=0)).data  # the source's own (a fork's cut may be its parent's)
    before = (created.get("memory_from") or {}).get("lineage", [])
    recorded = f"from:{source}" + (f"@{step}" if step is not None else "")
    # A checkpoint is a model of the source's lab: another lab's train.py may not even unpickle it.
    same_lab = (created.get("config") or {}).get("name") == lab.name
    return recorded, {
        "run": source, "step": step, "stream": stream, "n": n,
        "files": [{"path": path, "blob": blob} for path, blob in files],
        "checkpoint_blob": mem.checkpoint_blob if same_lab else None,
        "lineage": [*before, {"run": source, "step": step, "name": created.get("name")}],
    }


def describe(created: dict[str, Any]) -> str:
    """A run's memory policy in a few words, for status and reports."""
    policy = created.get("memory_policy") or "notes"
    if policy_kind(policy) != "from":
        return policy
    source = created.get("memory_from") or {}
    return f"from {source.get('run', '?')}" + (f" at step {source['step']}" if source.get("step") is not None else "")


def for_agent(created: dict[str, Any]) -> str:
    """What a session is told about its memory (the prompt's `{memory}`)."""
    kind = policy_kind(created.get("memory_policy"))
    if kind == "none":
        return ("Nothing carries over between sessions in this run: each session starts with empty "
                "memory/notes.md and memory/artifacts/ and no results table. What you write there is kept for "
                "the record, not shown to a later session.")
    if kind == "results-only":
        return ("memory/results.tsv lists every experiment so far. memory/notes.md and memory/artifacts/ start "
                "empty in every session: what you write there is kept for the record, not shown again.")
    text = ("memory/notes.md and memory/artifacts/ (files you want later; they have a size cap) are carried to "
            "your next session: write what you learn there. memory/results.tsv lists every experiment so far, "
            "and memory/checkpoint.pt is the best model so far.")
    if kind == "from":
        text = f"This run started with the memory of an earlier one ({describe(created)}). " + text
    return text
