"""What must hold of a home after any crash, checked with its daemon stopped (DESIGN sections 3 and 5).

`check_run` is the per-run part of the crash tests and the kill campaign (ops/chaos/kill.py):
- each (step, replica) has at most one finish that is not `interrupted`;
- every interrupted attempt was started again as the next attempt of its step and replica, with the same
  commit, once the run went on (a run that finished, or that started the next attempt);
- a run with nothing in flight has its workspace at its best commit.
Audit and replay (hash chains, payloads, blobs, commits, projections) are checked by their own modules.
"""

from __future__ import annotations

import collections

from rloopd.home import Home
from rloopd.memory.state import fold
from rloopd.snapshots import read_tree


def check_run(home: Home, run: str) -> list[str]:
    """The problems found in `run` (empty when it is consistent)."""
    events = list(home.log.read(run))
    problems = []
    finishes: collections.Counter = collections.Counter()
    interrupted = []
    for e in events:
        if e.type == "experiment.finished":
            key = (e.data["step"], e.data.get("replica", 0))
            if e.data["status"] == "interrupted":
                interrupted.append((key, e.data.get("attempt", 0), e.n))
            else:
                finishes[key] += 1
    problems += [f"run {run}: step {s} replica {r} finished {c} times" for (s, r), c in finishes.items() if c > 1]
    started = {(e.data["step"], e.data.get("replica", 0), e.data.get("attempt", 0)): e for e in events
               if e.type == "experiment.started"}
    state = fold(events)
    for (step, replica), attempt, n in interrupted:
        again = started.get((step, replica, attempt + 1))
        if state.status == "finished" or again is not None:
            if again is None or again.n < n:
                problems.append(f"run {run}: step {step} replica {replica} attempt {attempt} was interrupted and "
                                "never started again")
            elif again.data["commit"] != started[(step, replica, attempt)].data["commit"]:
                problems.append(f"run {run}: step {step} attempt {attempt + 1} did not retry the same change")
    if state.in_flight is None and state.best_commit is not None:
        workspace = home.run_dir(run) / "workspace"
        if not home.snapshots.tree_equal(state.best_commit, workspace):
            want = home.snapshots.ls(state.best_commit)
            have = {rel: home.snapshots.blob_sha(data) for rel, (_, data) in read_tree(workspace).items()}
            differ = sorted(r for r in set(want) | set(have) if want.get(r, ("", ""))[1] != have.get(r))
            problems.append(f"run {run}: the workspace is not at the best commit {state.best_commit[:12]} "
                            f"({', '.join(differ) or 'modes differ'})")
    return problems
