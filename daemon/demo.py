"""A scripted run written straight into the log, to show the event log until the research loop exists.

It trains nothing: the metrics are fixed numbers, and the run says so in its name and description.
"""

from __future__ import annotations

from rloopd.home import Home
from rloopd.log import NewEvent, new_id

SCRIPT = [  # (step, description, val_bpb)
    (0, "baseline", 3.10),
    (1, "LEARNING_RATE 3e-3 -> 1e-2", 2.95),
    (2, "DEPTH 2 -> 4", 3.02),
    (3, "WIDTH 64 -> 128", 2.81),
]


def scripted_run(home: Home) -> str:
    """Append a small, clearly scripted run (no training) and return its run id."""
    run = new_id()[:12]
    program = home.blobs.put_text("# scripted demo\nNo agent runs here; these events are a fixed script.\n")
    events = [NewEvent("run.created", {"name": f"scripted-{run[:6]}", "lab": "(scripted demo)",
                                       "agent": "scripted", "program_blob": program, "budget": "none"})]
    best = None
    for step, description, bpb in SCRIPT:
        log = home.blobs.put_text(f"scripted step {step}: {description}\nval_bpb: {bpb}\n")
        accepted = best is None or bpb < best
        before, best = best, (bpb if accepted else best)
        events += [
            NewEvent("experiment.started", {"step": step, "commit": f"scripted-{step}", "description": description}),
            NewEvent("experiment.finished", {"step": step, "status": "ok", "metrics": {"val_bpb": bpb},
                                             "log_blob": log}),
            NewEvent("experiment.decided", {"step": step, "accepted": accepted, "best_before": before,
                                            "best_after": best, "reason": "better" if accepted else "not better"}),
        ]
    events.append(NewEvent("run.finished", {"reason": "script ended", "best": best}))
    home.log.append(run, events, expected_n=0)
    return run
