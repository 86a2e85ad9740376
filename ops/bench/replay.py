"""Replay rate of a 1,000,000-event run against a bare scan-and-decode of the same rows, in the same run.

The run comes from ops/bench/synthetic.py (sessions acting ~200 times per experiment, ~4,900 experiments,
~11,000 blobs). Replay is `rloopd replay`'s whole work, in-process (`replay.replay`): one read transaction,
every event's chain hash and canonical text verified, every payload checked against its model, every blob
and commit checked, the run state, experiments table and run directory rebuilt and compared. The bare scan
is `SELECT` of the run's rows in order plus `json.loads` of each payload. The two take turns; the medians of
the rates (events/s) and their ratio are printed as one JSON line.

    python ops/bench/replay.py [--rounds 5] [--events 1000000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from synthetic import Shape, cached

from rloopd.home import Home
from rloopd.replay import replay


def bare_scan(home: Home, run: str) -> int:
    n = 0
    for row in home.log.conn.execute(
            "SELECT seq, id, stream, n, type, v, at, data, prev, hash FROM events WHERE stream = ? ORDER BY n", (run,)):
        json.loads(row[7])
        n += 1
    return n


def replayed(home: Home, run: str) -> int:
    report = replay(home, run)
    if not report.ok:
        raise SystemExit(f"replay of the synthetic run diverged: {report.divergences[:3]}")
    return report.events


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=None, help="where the copied home goes (default: a temp dir)")
    a = p.parse_args()
    rates: dict[str, list[float]] = {"replay": [], "bare": []}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        home_dir, run = cached(Shape(a.events), Path(tmp))
        with Home.open(home_dir) as home:
            bare_scan(home, run)  # warm-up: the page cache holds the table for both sides
            sides = [("replay", replayed), ("bare", bare_scan)]
            for r in range(a.rounds):
                for name, fn in sides if r % 2 == 0 else sides[::-1]:
                    t0 = time.perf_counter()
                    events = fn(home, run)
                    rates[name].append(events / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(json.dumps({
        "bench": "replay", "rounds": a.rounds, "events": events,
        "replay_events_per_s": round(med["replay"]), "bare_scan_events_per_s": round(med["bare"]),
        "ratio": round(med["replay"] / med["bare"], 3),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
