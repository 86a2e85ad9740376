"""Harness overhead per experiment through the daemon, against the same experiment command run bare.

A lab whose experiment returns at once (tests/labs/instant) runs under the random agent through a real
`rloopd serve`, in rounds that alternate with the same entry-point command run bare by subprocess.run.
Overhead per experiment = median cycle time in the daemon (decision to decision) minus the median bare
run. Then the idle daemon's CPU use and RSS. Prints one JSON line.

    python ops/bench/overhead.py [--experiments 200] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "tests" / "labs" / "instant"


def rloopd(home: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "rloopd", *args, "--home", str(home)], check=True,
                          capture_output=True, text=True).stdout


def run_events(home: Path, run: str) -> list[dict]:
    out = rloopd(home, "log", run, "--json")
    return [json.loads(line) for line in out.splitlines()]


def wait_finished(home: Path, run: str) -> list[dict]:
    while True:
        evs = run_events(home, run)
        if evs[-1]["type"] == "run.finished":
            return evs
        time.sleep(0.5)


def cycle_times(evs: list[dict]) -> list[float]:
    """Seconds from one experiment's decision to the next's (the harness's whole per-experiment cost)."""
    from datetime import datetime

    at = [datetime.fromisoformat(e["at"].replace("Z", "+00:00")) for e in evs if e["type"] == "experiment.decided"]
    return [(b - a).total_seconds() for a, b in zip(at[1:], at[2:], strict=False)]  # skip the baseline


def bare_times(tmp: Path, count: int) -> list[float]:
    ws, out = tmp / "bare-ws", tmp / "bare-out"
    shutil.copytree(LAB / "workspace", ws, dirs_exist_ok=True)
    out.mkdir(exist_ok=True)
    times = []
    for i in range(count):
        cmd = [sys.executable, str(LAB / "frozen" / "experiment.py"), "--workspace", str(ws), "--result",
               str(out / "result.json"), "--budget", "steps:10", "--seed", str(i), "--log", str(out / "log")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return times


def proc_stats(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, RSS in MiB) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:")) / 1024
    return cpu, rss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiments", type=int, default=200)
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    per_round = max(2, a.experiments // a.rounds)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        home = tmp / "home"
        daemon = subprocess.Popen([sys.executable, "-m", "rloopd", "serve", "--home", str(home), "--gpus", "none"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (home / "rloopd.sock").exists():
                time.sleep(0.1)
            time.sleep(0.5)
            cycles, bare = [], []
            for r in range(a.rounds):
                run = json.loads(rloopd(home, "run", "--lab", str(LAB), "-n", str(per_round), "--seed", str(r),
                                        "--detach", "--json"))["run_id"]
                cycles += cycle_times(wait_finished(home, run))
                bare += bare_times(tmp, per_round)
            time.sleep(2)
            cpu0, _ = proc_stats(daemon.pid)
            time.sleep(10)
            cpu1, rss = proc_stats(daemon.pid)
        finally:
            daemon.terminate()
            daemon.wait(30)
    med_cycle, med_bare = statistics.median(cycles), statistics.median(bare)
    print(json.dumps({
        "bench": "overhead", "experiments": len(cycles), "rounds": a.rounds,
        "median_cycle_ms": round(med_cycle * 1000, 1), "median_bare_ms": round(med_bare * 1000, 1),
        "overhead_ms": round((med_cycle - med_bare) * 1000, 1), "ratio": round(med_cycle / med_bare, 2),
        "idle_cpu_percent": round((cpu1 - cpu0) / 10 * 100, 2), "rss_mib": round(rss, 1),
    }))


if __name__ == "__main__":
    main()
