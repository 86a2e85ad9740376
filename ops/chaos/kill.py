"""Kill campaign: SIGKILL a live daemon at random moments, restart it, and check after every restart.

    python ops/chaos/kill.py [--kills 100] [--seed 0] [--minutes 20]

A daemon on a clean temporary home drives several runs of the instant lab: `random` runs and `cmd:` runs
whose agent edits train.py, writes notes and submits (each experiment sleeps a little, so kills land
during appends, commits, experiments, sessions, projection writes). Beside it a client makes CLI calls
(pause, resume, program, fork, new runs) and the agents record every `rloopd submit` that answered. Then,
`--kills` times: wait a random moment, SIGKILL the daemon and everything it started (as a control group
would), restart it (recovery happens before it answers: that time is the recovery time), stop it with
SIGTERM so that nothing moves, and check with it stopped:

- `audit` of every stream and `replay` of every run pass;
- nothing acknowledged is missing: every run a `run --detach` or `fork` returned exists, every acknowledged
  program change is in its run's log, each run has at least as many pauses and resumes as were acknowledged,
  and every submit that answered has its finish (with that status) and its decision;
- each (step, replica) has at most one finish that is not `interrupted`, every interrupted attempt was
  started again, and each workspace sits at its best commit (rloopd.invariants).

Prints one JSON line: kills, checks, failed checks (with the first problems), mean and max recovery
seconds, runs, experiments, acknowledgements. Bounded: --kills, --minutes, and a temporary home removed at
the end (kept with --keep). Exit 1 on any failed check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Daemon, check_home, cli, emit, make_lab, temp_home  # noqa: E402

AGENT = """#!/bin/sh
# A chaos agent: one change per session, a note, a submit; an answered submit is recorded outside the home.
n=$RLOOPD_SESSION
sed -i "s/^WIDTH = .*/WIDTH = $(( (n % 4 + 1) * 32 ))  # channels/" workspace/train.py
sed -i "s/^DEPTH = .*/DEPTH = $(( n % 5 + 1 ))  # blocks/" workspace/train.py
echo "session $n tried width and depth" >> memory/notes.md
echo "session $n" > memory/artifacts/last.txt
if out=$(rloopd submit --json -m "width and depth, session $n"); then
  echo "$RLOOPD_RUN $out" >> "$CHAOS_ACKS"
fi
"""


class Client(threading.Thread):
    """CLI calls while the daemon lives and dies; what each call acknowledged is recorded."""

    def __init__(self, home: Path, tmp: Path, labs: dict[str, Path], rng: random.Random, max_runs: int):
        super().__init__(daemon=True)
        self.home, self.tmp, self.labs, self.rng, self.max_runs = home, tmp, labs, rng, max_runs
        self.runs: list[str] = []
        self.acked: list[tuple[str, str, str]] = []  # (op, run, detail)
        self.paused: set[str] = set()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.up = threading.Event()  # cleared while the checks run: nothing may write then
        self.busy = threading.Lock()  # held during each call
        self.calls = 0

    def new_run(self, kind: str, seed: int) -> str | None:
        lab = self.labs[kind]
        agent = "random" if kind == "random" else f"cmd:{lab / 'agent.sh'}"
        proc = cli(self.home, "run", "--lab", str(lab), "--agent", agent, "-n", "100000", "--seed", str(seed),
                   "--sandbox", "none" if kind == "cmd" else "auto", "--detach", "--json")
        if proc.returncode != 0:
            return None
        run = json.loads(proc.stdout)["run_id"]
        with self.lock:
            self.runs.append(run)
            self.acked.append(("run", run, ""))
        return run

    def hold(self) -> None:
        """No call starts until `go`, and the one in progress has ended."""
        self.up.clear()
        with self.busy:
            pass

    def go(self) -> None:
        self.up.set()

    def run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(0.05, 0.4)):
            self.up.wait()
            with self.busy:
                if self.up.is_set():
                    self.call()

    def call(self) -> None:
        """One CLI call on a random run; what it acknowledged is recorded."""
        self.calls += 1
        n = self.calls
        with self.lock:
            runs = list(self.runs)
        if not runs:
            return
        run = self.rng.choice(runs)
        op = self.rng.choice(["pause", "program", "program", "fork"] +
                             (["new"] if len(runs) < self.max_runs else []))
        if run in self.paused:
            op = "resume"
        if op == "pause":  # a pause whose answer a kill cut may still have happened: resume it next either way
            self.paused.add(run)
            if cli(self.home, "pause", run).returncode == 0:
                self.acked.append(("pause", run, ""))
        elif op == "resume":
            self.paused.discard(run)
            if cli(self.home, "resume", run).returncode == 0:
                self.acked.append(("resume", run, ""))
        elif op == "program":
            text = f"# program {n}: {self.rng.random()}\n".encode()
            path = self.tmp / f"program-{n}.md"
            path.write_bytes(text)
            if cli(self.home, "program", run, str(path)).returncode == 0:
                self.acked.append(("program", run, hashlib.sha256(text).hexdigest()))
        elif op == "fork":
            proc = cli(self.home, "fork", run, "1", "--detach", "--json")
            if proc.returncode == 0:
                forked = json.loads(proc.stdout)["run_id"]
                with self.lock:
                    self.acked.append(("fork", forked, run))
                    if len(self.runs) < self.max_runs:
                        self.runs.append(forked)
                    else:
                        cli(self.home, "stop", forked)
        elif op == "new":
            self.new_run(self.rng.choice(["random", "cmd"]), n)


def check_acks(home: Path, client: Client, acks_file: Path) -> list[str]:
    """Nothing the CLI or a submit acknowledged is missing from the log."""
    from rloopd.home import Home

    problems = []
    with Home.open(home, create=False) as h:
        streams = set(h.log.streams())
        counts: Counter = Counter()
        for op, run, detail in list(client.acked):
            if op in ("run", "fork") and run not in streams:
                problems.append(f"acknowledged {op} {run} has no run.created")
            elif op == "program":
                blobs = {e.data["program_blob"] for e in h.log.read(run, types=["program.changed"])}
                if detail not in blobs:
                    problems.append(f"acknowledged program change {detail[:12]} of {run} is missing")
            elif op in ("pause", "resume"):
                counts[(op, run)] += 1
        for (op, run), acked in counts.items():
            found = sum(1 for e in h.log.read(run, types=[f"run.{op}d"]) if e.data.get("by") == "cli")
            if found < acked:
                problems.append(f"{run}: {acked} acknowledged {op}s, {found} in the log")
        lines = acks_file.read_text().splitlines() if acks_file.exists() else []
        for line in lines:
            run, _, raw = line.partition(" ")
            try:
                result = json.loads(raw)
            except ValueError:
                continue  # a line cut by the kill: the submit's answer was not complete
            step = result["step"]
            finished = [e.data for e in h.log.read(run, types=["experiment.finished"])
                        if e.data["step"] == step and not e.data.get("replica") and e.data["status"] != "interrupted"]
            decided = [e for e in h.log.read(run, types=["experiment.decided"]) if e.data["step"] == step]
            if not finished or finished[-1]["status"] != result["status"] or not decided:
                problems.append(f"{run}: the answered submit of step {step} ({result['status']}) is not in the log")
    return problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=20.0, help="stop early after this long (the figures say so)")
    p.add_argument("--max-runs", type=int, default=6)
    p.add_argument("--keep", action="store_true", help="keep the temporary home")
    args = p.parse_args()
    rng = random.Random(args.seed)
    tmp = temp_home("kill")
    home, acks = tmp / "home", tmp / "acks.txt"
    labs = {"random": make_lab(tmp / "lab-random", SLEEP=0.15), "cmd": make_lab(tmp / "lab-cmd", SLEEP=0.1)}
    agent = labs["cmd"] / "agent.sh"
    agent.write_text(AGENT)
    agent.chmod(0o755)
    with open(labs["cmd"] / "rloop.toml", "a") as f:
        f.write("\n[agent]\nbackoff = 0\ngrace = 1\nempty_cap = 100000\n")
    daemon = Daemon(home, "--cpu-slots", "2", env={"CHAOS_ACKS": str(acks)})
    began = time.monotonic()
    recoveries, failed, problems, kills, checks = [], 0, [], 0, 0
    client = Client(home, tmp, labs, rng, args.max_runs)
    try:
        daemon.start()
        for i, kind in enumerate(["random", "cmd", "random", "cmd"]):
            client.new_run(kind, i)
        client.start()
        client.go()
        while kills < args.kills and time.monotonic() - began < args.minutes * 60:
            time.sleep(rng.uniform(0.05, 1.5))
            daemon.kill()
            kills += 1
            recoveries.append(daemon.start())
            client.hold()
            daemon.term()  # the checks run with the daemon stopped: no session moves the state under them
            found = check_home(home) + check_acks(home, client, acks)
            checks += 1
            if found:
                failed += 1
                problems += found[:3]
            daemon.start()
            client.go()
            print(f"kill {kills}: recovered in {recoveries[-1]:.2f} s, {len(found)} problems", file=sys.stderr)
        client.stopping.set()
        client.hold()
        client.go()  # let the thread see that it is stopping
        client.join(30)
        daemon.term()
        final = check_home(home) + check_acks(home, client, acks)
        checks += 1
        if final:
            failed += 1
            problems += final[:3]
        from rloopd.history import run_state
        from rloopd.home import Home

        with Home.open(home, create=False) as h:
            all_runs = [e.stream for e in h.log.runs()]
            experiments = sum(run_state(h.log, r).experiments for r in all_runs)
            events = h.log.conn.execute("SELECT count(*) FROM events").fetchone()[0]
        emit({"campaign": "kill", "kills": kills, "checks": checks, "failed_checks": failed,
              "problems": problems[:10], "mean_recovery_s": round(sum(recoveries) / max(len(recoveries), 1), 3),
              "max_recovery_s": round(max(recoveries, default=0.0), 3), "runs": len(all_runs),
              "experiments": experiments, "events": events,
              "acknowledged": dict(Counter(op for op, _, _ in client.acked)) | {
                  "submit": len(acks.read_text().splitlines()) if acks.exists() else 0},
              "seconds": round(time.monotonic() - began, 1), "seed": args.seed,
              "stopped_early": kills < args.kills})
    finally:
        client.stopping.set()
        daemon.close()
        if args.keep:
            print(f"home kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed or kills < args.kills else 0


if __name__ == "__main__":
    sys.exit(main())
