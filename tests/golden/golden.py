"""Golden logs: small recorded runs kept in the repository, and the tools to write and load them.

A golden log is a directory: `events.jsonl` (the stored rows exactly: id, stream, n, type, v, at, the
data text, prev, hash), `blobs/<sha256>` (every blob the events name) and `snapshots.bundle` (a git bundle
of the run's commits). `load` puts one into a home AS IT IS, without verifying anything (unlike
`rloopd import`), then projects the run directory and the experiments table from it, so that tests can
hand replay and audit a log whose bytes were altered on disk and check that they say so.

Regenerate (only when the event format changes on purpose; the tests pin what these files say):

    .venv/bin/python -m tests.golden.golden
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from rloopd import events as ev
from rloopd.home import Home
from rloopd.log import canonical_event, canonical_json, chain_hash

HERE = Path(__file__).resolve().parent
ROWS = "id, stream, n, type, v, at, data, prev, hash"


def write(home: Home, run: str, dest: Path) -> None:
    """Write the run's stream (a root run: no parent) as a golden directory."""
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "blobs").mkdir(parents=True)
    lines, named = [], set()
    for row in home.log.conn.execute(f"SELECT {ROWS} FROM events WHERE stream = ? ORDER BY n", (run,)):
        lines.append(json.dumps(dict(zip(ROWS.split(", "), row, strict=True)), ensure_ascii=False))
        named.update(ev.blob_refs(json.loads(row[6])))
    (dest / "events.jsonl").write_text("\n".join(lines) + "\n")
    for digest in sorted(named):
        (dest / "blobs" / digest).write_bytes(home.blobs.get(digest))
    git(home.path / "git", "bundle", "create", str(dest / "snapshots.bundle"), f"--glob=refs/rloopd/{run}/*")


def load(src: Path, home: Home, events_file: str = "events.jsonl") -> str:
    """Put a golden directory into `home` unverified (see the module docstring) and project it; the run id."""
    from rloopd.loop import Loop
    from rloopd.memory.rundir import materialize_frozen
    from rloopd.runs import restore_workspace

    rows = [json.loads(line) for line in (src / events_file).read_text().splitlines() if line.strip()]
    with home.log.conn:
        home.log.conn.executemany(f"INSERT INTO events ({ROWS}) VALUES (?,?,?,?,?,?,?,?,?)",
                                  [tuple(r[k] for k in ROWS.split(", ")) for r in rows])
    for blob in (src / "blobs").iterdir():
        path = home.blobs.path(blob.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blob, path)  # as it is: a swapped blob stays swapped
    home.snapshots  # noqa: B018 - creates the repository
    git(home.path / "git", "fetch", "--quiet", str(src / "snapshots.bundle"), "refs/*:refs/*")
    run = rows[0]["stream"]
    loop = Loop(home, run)
    restore_workspace(home, loop.state, home.run_dir(run) / "workspace")
    materialize_frozen(home.run_dir(run), loop.created["manifest"], home.blobs)
    loop.project()
    return run


def git(git_dir: Path, *args: str) -> None:
    subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True)


def append_v1_session(home: Home, run: str) -> None:
    """A session as rloopd 0.1 recorded it: session.ended v1 had `tokens_in`/`tokens_out`, not `usage`."""
    home.log.append_one(run, "session.started", {"session": 1, "agent": "cmd:./agent.sh"})
    n, prev = home.log.head(run)
    n += 1
    at = "2026-11-01T12:00:00.000000Z"
    text = canonical_json({"session": 1, "exit_code": 0, "reason": "agent-exit", "tokens_in": 5123,
                           "tokens_out": 377})
    digest = chain_hash(prev, canonical_event(run, n, "session.ended", 1, at, text))
    with home.log.conn:
        home.log.conn.execute(f"INSERT INTO events ({ROWS}) VALUES (?,?,?,?,?,?,?,?,?)",
                              ("golden-v1-session-ended", run, n, "session.ended", 1, at, text, prev, digest))


def alter(src: Path) -> None:
    """Write the altered copies of `src`: an edited metric, a removed event, and which blob to swap (the
    test swaps its bytes in the loaded home); tests/test_golden.py says what replay must print for each."""
    lines = (src / "events.jsonl").read_text().splitlines()
    finished = next(i for i, line in enumerate(lines)
                    if '"experiment.finished"' in line and '"step\\":2' in line)
    row = json.loads(lines[finished])
    row["data"] = row["data"].replace('"val_bpb":', '"val_bpb":0.5,"was":', 1)  # a better number, same hash
    edited = lines[:finished] + [json.dumps(row, ensure_ascii=False)] + lines[finished + 1:]
    (src / "altered-metric.jsonl").write_text("\n".join(edited) + "\n")
    decided = next(i for i, line in enumerate(lines) if '"experiment.decided"' in line and '"step\\":1' in line)
    (src / "altered-removed.jsonl").write_text("\n".join(lines[:decided] + lines[decided + 1:]) + "\n")
    diffs = sorted({json.loads(json.loads(line)["data"])["diff_blob"] for line in lines
                    if '"experiment.started"' in line})
    (src / "swapped-blob.json").write_text(json.dumps({"blob": diffs[0], "with": diffs[1]}) + "\n")


def main() -> None:
    from rloopd import runs
    from rloopd.loop import Loop
    from tests.daemon_helpers import make_lab

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Home.open(tmp / "home") as home:
            run = runs.create_run(home, make_lab(tmp), agent="random", experiments=4, budget=None, seed=11,
                                  name="golden", sandbox="none")
            Loop(home, run).run()
            write(home, run, HERE / "run")
            old = runs.create_run(home, make_lab(tmp, "lab-v1"), agent="random", experiments=2, budget=None,
                                  seed=12, name="golden-v1", sandbox="none")
            append_v1_session(home, old)
            Loop(home, old).run()
            write(home, old, HERE / "v1-session")
    alter(HERE / "run")
    print("wrote", HERE / "run", HERE / "v1-session")


if __name__ == "__main__":
    main()
