"""Storage faults: the home's filesystem fills up mid-run; the daemon waits, says why, loses nothing, goes on.

    python ops/chaos/storage.py [--size-mb 48] [--runs 2]
    python ops/chaos/storage.py --db-cap [MIB] [--runs 2]

Needs root (or CAP_SYS_ADMIN) and `unshare`: the script runs itself again inside a private mount namespace
(`unshare -m`) and mounts a size-capped tmpfs there as the home, so the machine's real disk is never
filled. A daemon drives `--runs` runs of the instant lab; the campaign fills the tmpfs with a filler file,
waits until `rloopd status --json` shows every live run waiting for space (with the reason), checks that the
log still audits, removes the filler, waits until every run has made progress again, stops the daemon and
checks everything (audit, replay, the crash invariants). Both faults happen on the way: SQLite's "database
or disk is full" and ENOSPC from the blob store and git.

`--db-cap` fills the database instead of the disk, and needs neither root nor a tmpfs: the daemon serves a
home whose rloopd.toml sets `max_db_mb` (0.25 MiB unless given), the runs reach the cap mid-run, `status`
must say to raise `max_db_mb` and restart, the log must audit while full and the daemon stop cleanly on
SIGTERM; then the cap is raised fourfold in rloopd.toml, the daemon restarted, and every run must go on.

Prints one JSON line: whether the stall was seen and reported, its reason, the seconds until the runs went
on after space came back (after the restart, with `--db-cap`), experiments before and after, problems found.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Daemon, check_home, cli, emit, make_lab, temp_home  # noqa: E402

from rloopd.config import MIB, db_bytes  # noqa: E402


def status(home: Path) -> list[dict]:
    proc = cli(home, "status", "--json")
    return json.loads(proc.stdout) if proc.returncode == 0 else []


def experiments(home: Path) -> dict[str, int]:
    return {r["run_id"]: r["experiments"] for r in status(home)}


def wait(predicate, seconds: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def all_stalled(home: Path) -> bool:
    rows = status(home)
    return bool(rows) and all((r.get("live") or {}).get("stalled") for r in rows if r["status"] == "running")


def went_on(home: Path, before: dict[str, int]) -> bool:
    return all(n > before.get(r, 0) for r, n in experiments(home).items()) and \
        not any((r.get("live") or {}).get("stalled") for r in status(home))


def fill(path: Path) -> int:
    """Write a filler file until the filesystem refuses; its size."""
    written = 0
    with open(path, "wb") as f:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                f.write(chunk)
                f.flush()
                written += len(chunk)
        except OSError:
            pass
    return written


def inside(args: argparse.Namespace, tmp: Path) -> int:
    home = tmp / "home"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size_mb}m,mode=0755", "tmpfs", str(home)], check=True)
    lab = make_lab(tmp / "lab", SLEEP=0.05)
    daemon = Daemon(home, "--cpu-slots", "2")
    figures: dict = {"campaign": "storage", "size_mb": args.size_mb, "runs": args.runs}
    problems: list[str] = []
    try:
        daemon.start()
        for i in range(args.runs):
            cli(home, "run", "--lab", str(lab), "-n", "100000", "--seed", str(i), "--detach", "--json")
        wait(lambda: all(n >= 3 for n in experiments(home).values()), 60)
        filler = home / "filler.bin"
        figures["filler_mb"] = round(fill(filler) / (1 << 20), 1)

        took = wait(lambda: all_stalled(home), 60)
        rows = status(home)
        figures["stall_seen"] = took is not None
        figures["stall_reasons"] = sorted({(r.get("live") or {}).get("stalled", {}).get("why", "") for r in rows})
        text = cli(home, "status").stdout
        figures["status_says_why"] = "waiting for space" in text
        audit = cli(home, "audit")
        figures["audit_while_full"] = audit.returncode == 0
        before = experiments(home)
        figures["experiments_before"] = sum(before.values())
        time.sleep(args.hold)  # nothing may move while the disk is full
        if experiments(home) != before:
            problems.append("runs made progress while the disk was full")
        filler.unlink()
        resumed = wait(lambda: went_on(home, before), 120)
        figures["went_on"] = resumed is not None
        figures["seconds_to_go_on"] = None if resumed is None else round(resumed, 1)
        figures["experiments_after"] = sum(experiments(home).values())
        daemon.term()
        problems += check_home(home)
    except Exception as e:  # noqa: BLE001 - reported in the figures
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        daemon.close()
        subprocess.run(["umount", "-l", str(home)], check=False)
    figures["problems"] = problems[:10]
    emit(figures)
    ok = not problems and figures.get("stall_seen") and figures.get("went_on") and figures.get("status_says_why")
    return 0 if ok else 1


def db_cap(args: argparse.Namespace) -> int:
    """The database reaches `max_db_mb` mid-run; raising it in rloopd.toml and restarting lets the runs go on."""
    tmp = temp_home("storage-cap")
    home, conf = tmp / "home", tmp / "home" / "rloopd.toml"
    home.mkdir()
    conf.write_text(f"max_db_mb = {args.db_cap}\n")
    lab = make_lab(tmp / "lab", SLEEP=0.0)
    daemon = Daemon(home, "--cpu-slots", "2")
    figures: dict = {"campaign": "storage", "mode": "db-cap", "max_db_mb": args.db_cap, "runs": args.runs}
    problems: list[str] = []
    try:
        daemon.start()
        for i in range(args.runs):
            cli(home, "run", "--lab", str(lab), "-n", "100000", "--seed", str(i), "--detach", "--json")
        t0 = time.monotonic()
        took = wait(lambda: all_stalled(home), 120)
        figures["stall_seen"] = took is not None
        figures["seconds_to_cap"] = round(time.monotonic() - t0, 1)
        figures["db_mb_at_cap"] = round(db_bytes(home / "events.db") / MIB, 3)
        figures["stall_reasons"] = sorted({(r.get("live") or {}).get("stalled", {}).get("why", "") for r in status(home)})
        text = cli(home, "status").stdout
        figures["status_says_why"] = "waiting for space" in text and "max_db_mb" in text and "restart" in text
        figures["audit_while_full"] = cli(home, "audit").returncode == 0
        before = experiments(home)
        figures["experiments_before"] = sum(before.values())
        time.sleep(args.hold)
        if experiments(home) != before:
            problems.append("runs made progress while the database was at its cap")
        daemon.term()  # SIGTERM with the database full: it must still stop cleanly
        figures["stopped_cleanly"] = daemon.proc.returncode == 0
        if not figures["stopped_cleanly"]:
            problems.append(f"the daemon exited {daemon.proc.returncode} on SIGTERM at the cap")
        figures["raised_to"] = args.db_cap * 4
        conf.write_text(f"max_db_mb = {figures['raised_to']}\n")
        t0 = time.monotonic()
        daemon.start()
        resumed = wait(lambda: went_on(home, before), 120)
        figures["went_on"] = resumed is not None
        figures["seconds_to_go_on"] = None if resumed is None else round(time.monotonic() - t0, 1)
        figures["experiments_after"] = sum(experiments(home).values())
        daemon.term()
        problems += check_home(home)
    except Exception as e:  # noqa: BLE001 - reported in the figures
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        daemon.close()
        shutil.rmtree(tmp, ignore_errors=True)
    figures["problems"] = problems[:10]
    emit(figures)
    ok = not problems and figures.get("stall_seen") and figures.get("went_on") and figures.get("status_says_why")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=48)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--hold", type=float, default=3.0, help="seconds the disk stays full (nothing may move)")
    p.add_argument("--db-cap", type=float, nargs="?", const=0.25, metavar="MIB",
                   help="fill the database up to max_db_mb (default 0.25 MiB) instead of the disk; no root needed")
    p.add_argument("--inside", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.db_cap is not None:
        return db_cap(args)
    if args.inside:
        return inside(args, Path(args.inside))
    if os.geteuid() != 0 or not shutil.which("unshare"):
        emit({"campaign": "storage", "skipped": "needs root and unshare (a tmpfs in a private mount namespace)"})
        return 2
    tmp = temp_home("storage")
    try:
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, __file__,
                               "--size-mb", str(args.size_mb), "--runs", str(args.runs), "--hold", str(args.hold),
                               "--inside", str(tmp)],
                              timeout=600)
        return proc.returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
