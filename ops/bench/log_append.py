"""Append rate of rloopd's event log against bare sqlite3 with the same durability and row sizes.

Both sides write to their own fresh file in WAL mode with the same `synchronous` setting, one event per
transaction (then batches of 100), and take turns in the same process so that disk and CPU noise hit
both alike. Prints one JSON line: medians of the rates (events/s) and the ratios rloopd / sqlite3.

    python ops/bench/log_append.py [--rounds 7] [--per-round 200] [--synchronous FULL]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rloopd.log import SCHEMA, EventLog, NewEvent, canonical_json

PAYLOAD = {"step": 7, "status": "ok", "metrics": {"val_bpb": 1.2345678, "test_bpb": 1.25, "train_seconds": 12.0,
           "train_steps": 400, "params": 812345}, "log_blob": "a" * 64, "wall_seconds": 14.2}


def bare_connection(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    for statement in SCHEMA:  # the same table, indexes and triggers, so the same work per row
        conn.execute(statement)
    return conn


def bare_append(conn: sqlite3.Connection, n0: int, count: int, batch: int) -> None:
    data = canonical_json(PAYLOAD)
    at = "2026-11-26T21:48:16.123456Z"
    n = n0
    for _ in range(count // batch):
        rows = []
        for _ in range(batch):
            h = hashlib.sha256(str(n).encode()).hexdigest()
            rows.append((os.urandom(16).hex(), "run", n, "experiment.finished", 1, at, data, h, h))
            n += 1
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO events (id, stream, n, type, v, at, data, prev, hash) VALUES (?,?,?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")


def rloopd_append(log: EventLog, count: int, batch: int) -> None:
    for _ in range(count // batch):
        log.append("run", [NewEvent("experiment.finished", PAYLOAD) for _ in range(batch)])


def measure(rounds: int, per_round: int, batch: int, synchronous: str, tmp: Path) -> tuple[float, float]:
    tag = f"b{batch}"
    log = EventLog.open(tmp / f"rloopd-{tag}.db", synchronous=synchronous)
    bare = bare_connection(tmp / f"bare-{tag}.db", synchronous)
    ours, theirs = [], []
    rloopd_append(log, batch * 5, batch)  # warm-up both
    bare_append(bare, 0, batch * 5, batch)
    n = batch * 5
    for r in range(rounds):
        order = [("ours", ours), ("bare", theirs)] if r % 2 == 0 else [("bare", theirs), ("ours", ours)]
        for side, rates in order:
            t0 = time.perf_counter()
            if side == "ours":
                rloopd_append(log, per_round, batch)
            else:
                bare_append(bare, n, per_round, batch)
                n += per_round
            rates.append(per_round / (time.perf_counter() - t0))
    log.close()
    bare.close()
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--per-round", type=int, default=400)
    p.add_argument("--synchronous", default="FULL")
    p.add_argument("--dir", type=Path, default=None, help="where the databases go (default: a temp dir)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        ours1, bare1 = measure(a.rounds, a.per_round, 1, a.synchronous, Path(d))
        ours100, bare100 = measure(a.rounds, a.per_round * 50, 100, a.synchronous, Path(d))
    print(json.dumps({
        "bench": "log_append", "synchronous": a.synchronous, "rounds": a.rounds,
        "rloopd_events_per_s_1": round(ours1, 1), "sqlite3_events_per_s_1": round(bare1, 1),
        "ratio_1": round(ours1 / bare1, 3),
        "rloopd_events_per_s_100": round(ours100, 1), "sqlite3_events_per_s_100": round(bare100, 1),
        "ratio_100": round(ours100 / bare100, 3),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
