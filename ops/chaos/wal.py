"""Torn WAL: a writer killed mid-append leaves a write-ahead log that SQLite recovers; show it.

    python ops/chaos/wal.py [--trials 30] [--seed 0]

Each trial starts a child process that appends events to a fresh events.db (WAL mode, synchronous=FULL, the
daemon's settings) and prints every acknowledged append, SIGKILLs it at a random moment, and copies the
database and its -wal file as the disk holds them. Then, on two copies:

- torn tail: a partial frame of random bytes is appended to the WAL (a write cut short by the kill). SQLite
  must ignore it: every acknowledged event is there and `audit` passes;
- truncated: the WAL is cut at a random offset (a torn page). SQLite must still open the log to a prefix
  of it, whole events only, that `audit` passes (events after the cut may be gone: that data was removed
  from under SQLite, which no database survives; what matters is that nothing half-written appears).

Prints one JSON line: trials, acknowledged events, acknowledged events missing after a torn tail (must be
0), audits failed (must be 0).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, temp_home  # noqa: E402

WRITER = """
import sys
from pathlib import Path
from rloopd.log import EventLog, NewEvent
log = EventLog.open(Path(sys.argv[1]))
n = 0
while True:
    log.append("chaos", [NewEvent("run.warned", {"about": "wal", "message": "x" * (n % 700)})], expected_n=n)
    print(n, flush=True)
    n += 1
"""


def audit_ok(db: Path) -> tuple[bool, int]:
    from rloopd.audit import audit
    from rloopd.log import EventLog

    log = EventLog.open(db)
    try:
        report = audit(log, None)
        count = log.conn.execute("SELECT count(*) FROM events").fetchone()[0]
        return report.ok, count
    finally:
        log.conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    tmp = temp_home("wal")
    acked_total = missing = failed_audits = truncated_kept = 0
    began = time.monotonic()
    try:
        for trial in range(args.trials):
            work = tmp / f"t{trial}"
            work.mkdir()
            db = work / "events.db"
            child = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(0.3, 1.2))
            os.kill(child.pid, signal.SIGKILL)
            out, _ = child.communicate()
            acked = len(out.split())
            acked_total += acked
            for case in ("torn", "truncated"):
                copy = work / case
                copy.mkdir()
                for suffix in ("", "-wal"):
                    if Path(f"{db}{suffix}").exists():
                        shutil.copyfile(f"{db}{suffix}", copy / f"events.db{suffix}")
                wal = copy / "events.db-wal"
                if case == "torn" and wal.exists():
                    with open(wal, "ab") as f:
                        f.write(rng.randbytes(rng.randrange(24, 4096 + 24)))
                elif case == "truncated" and wal.exists() and wal.stat().st_size:
                    os.truncate(wal, rng.randrange(wal.stat().st_size))
                ok, count = audit_ok(copy / "events.db")
                failed_audits += not ok
                if case == "torn":
                    missing += max(0, acked - count)
                else:
                    truncated_kept += count
            shutil.rmtree(work)
        emit({"campaign": "wal", "trials": args.trials, "acknowledged": acked_total,
              "missing_after_torn_tail": missing, "audits_failed": failed_audits,
              "events_kept_after_truncation": truncated_kept, "seconds": round(time.monotonic() - began, 1)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if missing or failed_audits else 0


if __name__ == "__main__":
    sys.exit(main())
