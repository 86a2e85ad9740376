"""Load: CLI clients hammer a daemon that runs many runs at once; nothing is lost and nothing is locked.

    python ops/chaos/load.py [--runs 20] [--experiments 20] [--clients 8] [--minutes 10]

A daemon on a clean temporary home runs `--runs` runs of the instant lab (an experiment returns at once;
every fifth run is a `cmd:` agent that submits its own experiments), while `--clients` threads each loop over
`rloopd status --json`, `rloopd log RUN --json`, `rloopd batch status`-free reads and pause/resume pairs.
Every call's answer is recorded. At the end, with the daemon stopped:

- every run finished with all its experiments; audit and replay of every run pass (rloopd.invariants too);
- every acknowledged pause and resume is in its run's log (zero lost events);
- no call failed with "database is locked" (SQLite's busy errors must never reach a user).

Prints one JSON line: runs, experiments, experiments per minute, calls by kind, lock errors, other errors
(with the first few), lost events, the daemon's peak RSS in MB, seconds.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Daemon, check_home, cli, emit, make_lab, temp_home  # noqa: E402

AGENT = """#!/bin/sh
n=$RLOOPD_SESSION
sed -i "s/^WIDTH = .*/WIDTH = $(( (n % 3 + 1) * 32 ))  # channels/" workspace/train.py
rloopd submit -m "width, session $n" > /dev/null
"""
EXPECTED = ("not running: nothing to pause", "only a paused or stopped run can resume")  # races with the run itself


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--experiments", type=int, default=20)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    tmp = temp_home("load")
    home = tmp / "home"
    lab = make_lab(tmp / "lab", SLEEP=0.0)
    agent = lab / "agent.sh"
    agent.write_text(AGENT)
    agent.chmod(0o755)
    with open(lab / "rloop.toml", "a") as f:
        f.write("\n[agent]\nbackoff = 0\ngrace = 1\n")
    daemon = Daemon(home, "--cpu-slots", "4")
    calls: Counter = Counter()
    latency: dict[str, list[float]] = {"status": [], "log": [], "pause": []}
    locked, errors, acked = [], [], Counter()
    stop = threading.Event()
    peak = [0.0]
    began = time.monotonic()

    def client(k: int, runs: list[str]) -> None:
        rng = random.Random(args.seed * 100 + k)
        while not stop.is_set():
            run = rng.choice(runs)
            kind = rng.choice(["status", "log", "pause"])
            argv = {"status": ["status", "--json"], "log": ["log", run, "--json"], "pause": ["pause", run]}[kind]
            t0 = time.monotonic()
            proc = cli(home, *argv, timeout=120)
            latency[kind].append(time.monotonic() - t0)
            calls[kind] += 1
            if proc.returncode == 0 and kind == "pause":
                acked[("paused", run)] += 1
                proc = cli(home, "resume", run, timeout=120)
                calls["resume"] += 1
                kind = "resume"
                if proc.returncode == 0:
                    acked[("resumed", run)] += 1
            if proc.returncode != 0:
                text = proc.stderr.strip()
                if "locked" in text.lower():
                    locked.append(f"{kind}: {text[:200]}")
                elif not any(e in text for e in EXPECTED):
                    errors.append(f"{kind}: {text[:200]}")

    try:
        daemon.start()
        runs = []
        for i in range(args.runs):
            agent_spec = f"cmd:{agent}" if i % 5 == 4 else "random"
            proc = cli(home, "run", "--lab", str(lab), "--agent", agent_spec, "-n", str(args.experiments),
                       "--seed", str(i), "--detach", "--json")
            if proc.returncode != 0:
                raise RuntimeError(f"rloopd run failed: {proc.stderr}")
            runs.append(__import__("json").loads(proc.stdout)["run_id"])
        threads = [threading.Thread(target=client, args=(k, runs), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        from rloopd.history import run_state
        from rloopd.home import Home

        def done() -> bool:
            with Home.open(home, create=False) as h:
                return all(run_state(h.log, r).status in ("finished", "failed") for r in runs)

        while time.monotonic() - began < args.minutes * 60 and not done():
            peak[0] = max(peak[0], rss_mb(daemon.proc.pid))
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(150)
        # a run paused by the last client call is resumed, so that every run can finish
        with Home.open(home, create=False) as h:
            paused = [r for r in runs if run_state(h.log, r).status == "paused"]
        for r in paused:
            cli(home, "resume", r)
        while time.monotonic() - began < args.minutes * 60 and not done():
            time.sleep(0.5)
        wall = time.monotonic() - began
        daemon.term()
        problems = check_home(home)
        lost = []
        with Home.open(home, create=False) as h:
            states = {r: run_state(h.log, r) for r in runs}
            for (what, run), n in acked.items():
                found = sum(1 for e in h.log.read(run, types=[f"run.{what}"]) if e.data.get("by") == "cli")
                if found < n:
                    lost.append(f"{run}: {n} acknowledged {what}, {found} in the log")
        unfinished = [r for r, s in states.items() if s.status != "finished" or s.experiments != args.experiments]
        experiments = sum(s.experiments for s in states.values())
        emit({"campaign": "load", "runs": len(runs), "clients": args.clients, "experiments": experiments,
              "experiments_per_minute": round(experiments / (wall / 60), 1), "calls": dict(calls),
              "lock_errors": len(locked), "other_errors": len(errors), "first_errors": (locked + errors)[:5],
              "lost_events": len(lost), "unfinished_runs": len(unfinished), "check_problems": problems[:5],
              "daemon_peak_rss_mb": round(peak[0], 1), "seconds": round(wall, 1),
              "call_seconds": {k: {"median": round(statistics.median(v), 2), "max": round(max(v), 2)}
                               for k, v in latency.items() if v}})
        return 1 if locked or errors or lost or unfinished or problems else 0
    finally:
        stop.set()
        daemon.close()
        if args.keep:
            print(f"home kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
