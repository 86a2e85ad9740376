"""A long synthetic run for the fork and replay benchmarks: real formats, built fast, cached.

The run is created by the real code (`runs.create_run` on tests/labs/instant: manifest, blobs, base
commit). The rest of its history is generated in the shape of an agent-driven run: sessions act many times
per experiment (`agent.acted`), write a note now and then (`memory.written`), submit, and the experiment is
started, finished, checkpointed when accepted, and decided. Each row gets its chain hash exactly as
`EventLog.append` computes it (payloads validated, canonical text), and all rows go in with executemany in
one transaction. The experiments' commits are made by one `git fast-import`; blobs are written without fsync.
The fold is kept as the loop keeps it: after each decision the real `FoldSnapshots.save_if_due` stores a
snapshot when one is due, and at the end the experiments table and the run directory are projected, so that
`rloopd replay` of the generated run is clean.

Homes are cached under the temp dir, keyed by the parameters and a digest of the code they depend on, so a
rerun costs a copy. Run alone, this builds (or finds) one home and prints where it is:

    python ops/bench/synthetic.py [--events 1000000] [--acts 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rloopd import events as ev
from rloopd import runs
from rloopd.blobs import BlobStore, digest_of
from rloopd.home import Home
from rloopd.log import Event, canonical_event, canonical_json, chain_hash
from rloopd.memory import folded
from rloopd.memory.experiments import ExperimentsTable
from rloopd.memory.rundir import project_memory

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "tests" / "labs" / "instant"
KINDS = ("reasoning", "command", "edit", "tool", "message")
SUMMARIES = ("read results.tsv and notes.md", "python -c 'import train; print(train.DEPTH)'",
             "edit workspace/train.py: LEARNING_RATE", "grep -n WIDTH workspace/train.py",
             "the last change made val_bpb worse; try a smaller step")
INSERT = "INSERT INTO events (id, stream, n, type, v, at, data, prev, hash) VALUES (?,?,?,?,?,?,?,?,?)"


@dataclass(frozen=True)
class Shape:
    events: int  # at least this many events in the run
    acts: int = 200  # agent.acted events per experiment
    accept: float = 0.15  # share of experiments accepted
    note_every: int = 5  # a memory.written every this many experiments
    session_every: int = 20  # a new session every this many experiments
    seed: int = 0

    def stem(self) -> str:
        return f"rloopd-bench-{self.events}-{self.acts}-{self.accept}-{self.note_every}-{self.session_every}-{self.seed}"

    def key(self) -> str:
        """The stem and a digest of the code the cached home depends on (this file, the fold's code)."""
        code = hashlib.sha256(Path(__file__).read_bytes() + folded.fingerprint().encode()).hexdigest()[:12]
        return f"{self.stem()}-{code}"


def put_fast(blobs: BlobStore, data: bytes) -> str:
    """A blob written as the store would name it, without fsync: a benchmark's files need not be durable."""
    digest = digest_of(data)
    path = blobs.path(digest)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o444)
    return digest


def _at(t: float) -> str:
    seconds = int(t)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{int((t - seconds) * 1e6):06d}Z"


def _commits(home: Home, run: str, base: str, train: str, plan: list[dict]) -> list[str]:
    """One commit per experiment (train.py changed), each on the best commit before it, as the loop makes them."""
    stream, marks = [], Path(tempfile.mkdtemp()) / "marks"
    best = base
    for p in plan:
        text = f"{train}# step {p['step']}: LEARNING_RATE = {p['lr']:.6g}\n".encode()
        msg = p["description"].encode()
        stream += [f"commit refs/rloopd/{run}/s{p['step']}-a0\nmark :{p['step'] + 1}\n"
                   f"committer rloopd <rloopd@localhost> 1700000000 +0000\ndata {len(msg)}\n".encode(), msg,
                   f"\nfrom {best}\nM 100644 inline train.py\ndata {len(text)}\n".encode(), text, b"\n"]
        if p["accepted"]:
            best = f":{p['step'] + 1}"
    subprocess.run(["git", f"--git-dir={home.path / 'git'}", "fast-import", "--quiet", f"--export-marks={marks}"],
                   input=b"".join(stream), check=True, env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"})
    by_mark = dict(line.split() for line in marks.read_text().splitlines())
    shutil.rmtree(marks.parent)
    return [by_mark[f":{p['step'] + 1}"] for p in plan]


def _plan(shape: Shape, rng: random.Random) -> list[dict]:
    per = shape.acts + 4 + shape.accept + 1 / shape.note_every + 2 / shape.session_every
    plan, best = [], 3.0
    for step in range(1, max(int(shape.events / per), 0) + 2):
        crashed = rng.random() < 0.05
        value = best + rng.uniform(-0.02, 0.12)
        accepted = not crashed and (value < best if rng.random() < 0.5 else rng.random() < shape.accept)
        value = min(value, best - 1e-4) if accepted else max(value, best)
        if accepted:
            best = value
        lr = 10 ** rng.uniform(-4, -1)
        plan.append({"step": step, "lr": lr, "crashed": crashed, "value": value, "accepted": accepted,
                     "best": best, "description": f"LEARNING_RATE {lr:.2e} (step {step})"})
    return plan


def build(home_dir: Path, shape: Shape) -> dict:
    """Create the home and its one run; return the run id and its numbers of events and experiments."""
    rng = random.Random(shape.seed)
    home = Home.open(home_dir, synchronous="OFF")
    run = runs.create_run(home, LAB, agent="random", experiments=None, budget=None, seed=shape.seed,
                          name="synthetic", sandbox="none")
    log, blobs = home.log, home.blobs
    f = folded.fold_history(log, run)
    store = folded.FoldSnapshots(log)
    created = f.state.created
    plan = _plan(shape, rng)
    commits = _commits(home, run, created["base_commit"], (LAB / "workspace" / "train.py").read_text(), plan)
    n, link = log.head(run)
    n += 1
    seq = log.last_seq() + 1
    t = time.time()
    pending: list[tuple] = []
    notes: list[str] = []

    def add(type_: str, data: dict, dt: float = 0.5) -> None:
        nonlocal n, link, seq, t
        data = ev.validate(type_, data)
        text, at, v = canonical_json(data), _at(t), ev.current_version(type_)
        h = chain_hash(link, canonical_event(run, n, type_, v, at, text))
        e = Event(seq, os.urandom(16).hex(), run, n, type_, v, at, data, link, h)
        pending.append((e.id, run, n, type_, v, at, text, link, h))
        f.add([e])
        n, link, seq, t = n + 1, h, seq + 1, t + dt

    def project() -> None:  # what the loop does after a decision, as far as the log is concerned
        log.conn.executemany(INSERT, pending)
        pending.clear()
        store.save_if_due(f, run)

    log.conn.execute("BEGIN IMMEDIATE")
    best_commit, session = created["base_commit"], 0
    add("experiment.started", {"step": 0, "commit": best_commit, "description": "baseline"})
    add("experiment.finished", {"step": 0, "status": "ok", "metrics": {"val_bpb": 3.0}, "wall_seconds": 12.0}, 12)
    add("experiment.decided", {"step": 0, "accepted": True, "reason": "baseline", "best_after": 3.0,
                               "best_commit": best_commit})
    project()
    for p, commit in zip(plan, commits, strict=True):
        step = p["step"]
        if (step - 1) % shape.session_every == 0:
            if session:
                add("session.ended", {"session": session, "reason": "agent-exit", "exit_code": 0,
                                      "usage": {"input": 52000 + step, "output": 3100}})
            session += 1
            add("session.started", {"session": session, "agent": "cmd:claude", "program_blob": f.mem.program_blob})
        for i in range(shape.acts):
            add("agent.acted", {"session": session, "kind": KINDS[i % len(KINDS)],
                                "summary": f"{SUMMARIES[(i + step) % len(SUMMARIES)]} ({step}.{i})"}, 1.5)
        if step % shape.note_every == 0:
            notes = [*notes[-19:], f"- step {step}: {p['description']} -> {p['value']:.4f}"]
            add("memory.written", {"path": "notes.md", "blob": put_fast(blobs, "\n".join(notes).encode()),
                                   "session": session})
        add("experiment.submitted", {"session": session, "message": p["description"], "ticket": f"t{step}"})
        add("experiment.started", {
            "step": step, "commit": commit, "description": p["description"], "category": "learning rate",
            "params": {"LEARNING_RATE": p["lr"]}, "program_blob": f.mem.program_blob,
            "diff_blob": put_fast(blobs, f"-LEARNING_RATE = 0.01\n+LEARNING_RATE = {p['lr']:.6g}\n".encode())},
            14.2)
        status = "crashed" if p["crashed"] else "ok"
        metrics = {} if p["crashed"] else {"val_bpb": p["value"], "test_bpb": p["value"] + 0.01,
                                           "train_seconds": 12.0, "train_steps": 400 + step, "params": 812345}
        add("experiment.finished", {"step": step, "status": status, "metrics": metrics, "wall_seconds": 14.2,
                                    "log_blob": put_fast(blobs, f"step {step}\n{json.dumps(metrics)}\n".encode() * 8)})
        if p["accepted"]:
            add("checkpoint.saved", {"step": step, "blob": put_fast(blobs, rng.randbytes(16384))})
            best_commit = commit
        add("experiment.decided", {"step": step, "accepted": p["accepted"], "reason": "synthetic",
                                   "best_before": p["best"], "best_after": p["best"], "best_commit": best_commit})
        project()
    add("run.finished", {"reason": "experiment budget spent", "best": plan[-1]["best"] if plan else 3.0,
                         "best_commit": best_commit})
    project()
    log.conn.execute("COMMIT")
    ExperimentsTable(log).catch_up()
    project_memory(home.run_dir(run), f.mem, blobs, f.results_tsv(created["metric"]))
    ExperimentsTable(log).set_position(f"rundir:{run}", f.state.position)
    home.close()
    return {"run": run, "events": f.state.position + 1, "experiments": len(plan)}


def ensure(shape: Shape) -> tuple[Path, dict]:
    """The cached directory for `shape` under the temp dir (built on first use) and what `build` returned."""
    cache = Path(tempfile.gettempdir()) / shape.key()
    if not (cache / "run.json").exists():
        for stale in cache.parent.glob(f"{shape.stem()}-*"):  # made by other code: half a GB each at 1M events
            shutil.rmtree(stale, ignore_errors=True)
        building = cache.with_name(cache.name + f".{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        (building / "run.json").parent.mkdir(parents=True)
        meta = build(building / "home", shape)
        (building / "run.json").write_text(json.dumps(meta))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(building, cache)
    return cache, json.loads((cache / "run.json").read_text())


def cached(shape: Shape, into: Path) -> tuple[Path, str]:
    """A copy under `into` of the home for `shape` (benchmarks write to it); (home, run id)."""
    cache, meta = ensure(shape)
    dest = into / shape.key()
    shutil.copytree(cache / "home", dest, symlinks=True)
    return dest, meta["run"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--acts", type=int, default=Shape.acts)
    a = p.parse_args()
    shape = Shape(a.events, a.acts)
    started = time.perf_counter()
    cache, meta = ensure(shape)
    print(json.dumps({"bench": "synthetic", "home": str(cache / "home"), **meta,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
