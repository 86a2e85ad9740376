"""Hostile agents: each case a `cmd:` agent that attacks, driven by a live daemon beside well-behaved runs.

    python ops/chaos/hostile.py [--size-mb 1536] [--no-training]

Needs root, bubblewrap and `unshare`: the script runs itself again inside a private mount namespace and puts
the home on a size-capped tmpfs there, so the disk-filling case can never reach the machine's real disk.
One daemon (3 CPU slots) drives, at the same time:

- two bystanders on the instant lab: a `random` run and a `cmd:` agent that edits and submits;
- one run per hostile case (ops/chaos/hostile_agents.py), each with tight session limits (64 processes,
  1 GiB of address space, 16 MB per file, 64 MB of files in all, a 4-second window for the one that sleeps);
- with `--no-training` left out, a run of the reference lab whose agent submits forged, look-ahead, greedy
  and clock-ignoring train.py files (tests/labfixtures) after an honest bigram.

Then, with the daemon stopped, it reads the log and says for each case what was tried, what it met, and
what the log recorded it as; a case is contained when nothing it tried worked and the run went on (or ended
for the recorded reason). The bystanders must be unaffected: their experiments (step, status, metric,
decision) equal those of the same runs made alone on a clean home beforehand, and the home's filesystem never
came near full. Audit, replay and the crash invariants must pass for every run.

Prints a table on stderr and one JSON line: cases, contained, the outcome of each, bystanders unaffected,
the most of the tmpfs ever used, problems. Exit 1 unless everything is contained.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Daemon, check_home, cli, emit, make_lab, temp_home  # noqa: E402
from hostile_agents import BOMB_TRAIN, CASES, FLOOD_TRAIN, script  # noqa: E402

LIMITS = ("backoff = 0\ngrace = 1\nempty_cap = 1\nsession_timeout = 300\nprocesses = 64\nmemory_mb = 1024\n"
          "file_mb = 16\ndisk_mb = 64\nworkspace_mb = 8\nnotes_mb = 1\n")
BYSTANDER = """#!/bin/sh
n=$RLOOPD_SESSION
sed -i "s/^WIDTH = .*/WIDTH = $(( (n % 4 + 1) * 32 ))/" workspace/train.py
echo "session $n" >> memory/notes.md
rloopd submit -m "width, session $n"
"""
FIXTURES = ("bigram.py", "forger.py", "lookahead.py", "greedy.py", "ignores_clock.py")
TINY = {"DEPTH": 1, "WIDTH": 64, "N_HEAD": 2, "MLP_RATIO": 2, "CONTEXT": 32, "BATCH_SIZE": 8, "WARMUP": 2}


def agent_lab(dest: Path, body: str, env: dict[str, str] | None = None, extra: str = "", *,
              base: Path | None = None) -> Path:
    """A lab (the instant one unless `base`) whose agent is `body`, with the campaign's session limits."""
    lab = make_lab(dest) if base is None else base
    (lab / "agent").write_text(body)
    (lab / "agent").chmod(0o755)
    with open(lab / "rloop.toml", "a") as f:
        f.write(extra + "\n[agent]\n" + LIMITS)
        if env:
            f.write("env = { " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in env.items()) + " }\n")
    return lab


def reference_lab(dest: Path) -> Path:
    """The reference lab, small: tiny constants, steps:5, 64 KB of data, a 20 s limit per child, 3 GB of memory."""
    from rloopd.lab import set_constants

    dest.mkdir()
    for name in ("rloop.toml", "program.md"):
        shutil.copy(ROOT / name, dest / name)
    for name in ("workspace", "frozen"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    train = dest / "workspace" / "train.py"
    train.write_text(set_constants(train.read_text(), TINY))
    toml = (dest / "rloop.toml").read_text()
    for key, value in (("budget", '"steps:5"'), ("timeout", "20"), ("source", '"synthetic:64K"'),
                       ("warm_start", "false")):
        toml = "\n".join(f"{key} = {value}" if line.startswith(f"{key} ") else line for line in toml.splitlines())
    (dest / "rloop.toml").write_text(toml.replace('[metric]', 'memory_limit_mb = 3000\n\n[metric]', 1) + "\n")
    return dest


def start_run(home: Path, lab: Path, agent: str, *args: str) -> str:
    proc = cli(home, "run", "--lab", str(lab), "--agent", agent, "--detach", "--json", *args)
    if proc.returncode != 0:
        raise RuntimeError(f"rloopd run {lab.name}: {proc.stderr.strip()}")
    return json.loads(proc.stdout.splitlines()[-1])["run_id"]


def outcomes(home: Path, run: str) -> list[tuple]:
    """What a bystander's log says it did: (step, replica, status, metric, decision)."""
    from rloopd.home import Home

    with Home.open(home, create=False) as h:
        finished = {(e.data["step"], e.data.get("replica", 0)): e.data
                    for e in h.log.read(run, types=["experiment.finished"]) if e.data["status"] != "interrupted"}
        decided = {e.data["step"]: e.data["accepted"] for e in h.log.read(run, types=["experiment.decided"])}
    return sorted((s, r, d["status"], (d.get("metrics") or {}).get("val_bpb"), decided.get(s))
                  for (s, r), d in finished.items())


def disturbed(home: Path, run: str) -> list[str]:
    """Signs that a bystander was disturbed beyond its results: a warning, a session ended for another reason
    than its agent's exit, a violation."""
    from rloopd.home import Home

    with Home.open(home, create=False) as h:
        events = list(h.log.read(run, types=["run.warned", "session.ended", "integrity.violated"]))
    return [f"{e.type} {e.data.get('reason') or e.data.get('message') or e.data.get('found')}" for e in events
            if not (e.type == "session.ended" and e.data["reason"] == "agent-exit")]


def bystanders(home: Path, labs: dict[str, Path]) -> dict[str, str]:
    return {"random": start_run(home, labs["random"], "random", "-n", "12", "--seed", "11"),
            "cmd": start_run(home, labs["cmd"], f"cmd:{labs['cmd'] / 'agent'}", "-n", "5", "--seed", "12")}


def wait_finished(home: Path, runs: list[str], seconds: float) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = {r["run_id"]: r for r in json.loads(cli(home, "status", "--json").stdout or "[]")}
        left = [r for r in runs if rows.get(r, {}).get("status") not in ("finished", "failed", "stopped")]
        if not left:
            return []
        time.sleep(1)
    return left


class DiskWatch(threading.Thread):
    """The most of the home's filesystem ever in use, sampled every 50 ms."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.most, self.most_mb, self.stop = path, 0.0, 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            st = os.statvfs(self.path)
            self.most = max(self.most, 1 - st.f_bavail / st.f_blocks)
            self.most_mb = max(self.most_mb, (st.f_blocks - st.f_bavail) * st.f_frsize / (1 << 20))


def inside(args: argparse.Namespace, tmp: Path) -> int:
    from hostile_judge import judge  # the reading of the log, apart from the driving

    home, quiet = tmp / "home", tmp / "quiet"
    for d in (home, quiet):
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size_mb}m,mode=0755", "tmpfs", str(d)], check=True)
    python = sys.executable
    labs = {"random": make_lab(tmp / "lab-random", SLEEP=0.2),
            "cmd": agent_lab(tmp / "lab-cmd", BYSTANDER, extra="", base=make_lab(tmp / "lab-cmd", SLEEP=0.2))}
    figures: dict = {"campaign": "hostile", "size_mb": args.size_mb}
    problems: list[str] = []
    t0 = time.monotonic()
    daemon = Daemon(quiet, "--cpu-slots", "3")
    try:  # the bystanders alone first, on a clean home: what "unaffected" must equal
        daemon.start()
        alone = bystanders(quiet, labs)
        if left := wait_finished(quiet, list(alone.values()), 180):
            problems.append(f"bystanders alone did not finish: {left}")
        daemon.term()
    finally:
        daemon.close()
    expected = {k: outcomes(quiet, r) for k, r in alone.items()}
    daemon = Daemon(home, "--cpu-slots", "3")
    watch = DiskWatch(home)
    runs: dict[str, str] = {}
    try:
        daemon.start()
        watch.start()
        time.sleep(0.2)
        baseline_mb = watch.most_mb
        beside = bystanders(home, labs)
        env = {"HOSTILE_HOME": str(home), "HOSTILE_OTHER": beside["cmd"]}
        for case in CASES:
            if case == "training":
                if args.no_training:
                    continue
                fixtures = {n: (ROOT / "tests" / "labfixtures" / n).read_text() for n in FIXTURES}
                fixtures.update({"bomb.py": BOMB_TRAIN, "flood.py": FLOOD_TRAIN})
                lab = agent_lab(tmp / f"lab-{case}", script(case, python),
                                {**env, "HOSTILE_FIXTURES": json.dumps(fixtures)}, base=reference_lab(tmp / "lab-ref"))
                runs[case] = start_run(home, lab, f"cmd:{lab / 'agent'}", "-n", str(len(fixtures)))
                continue
            lab = agent_lab(tmp / f"lab-{case}", script(case, python), {**env, "HOSTILE_LAB": str(tmp / f"lab-{case}")})
            extra = ["--window", "4s"] if case == "sleep-past-the-window" else []
            runs[case] = start_run(home, lab, f"cmd:{lab / 'agent'}", "-n", "2", *extra)
        if left := wait_finished(home, [*runs.values(), *beside.values()], args.minutes * 60):
            problems.append(f"runs still going after {args.minutes} min: {left}")
        daemon.term()
    except Exception as e:  # noqa: BLE001 - reported in the figures
        problems.append(f"{type(e).__name__}: {e}")
    finally:
        daemon.close()
        watch.stop.set()
    figures["cases"] = []
    if not problems:
        rows, more = judge(home, runs, tmp)
        figures["cases"] = rows
        problems += more
        for kind, run in beside.items():
            got = outcomes(home, run)
            if got != expected[kind]:
                problems.append(f"bystander {kind} differs from its run alone: {got} != {expected[kind]}")
            problems += [f"bystander {kind}: {p}" for p in disturbed(home, run)]
        figures["home_mb_over_the_start"] = round(watch.most_mb - baseline_mb)
        if watch.most_mb - baseline_mb > 64 + 256:  # disk_mb, and what the 0.1 s poll lets a writer add
            problems.append(f"the home grew {watch.most_mb - baseline_mb:.0f} MB: the disk cap (64 MB) did not hold")
        figures["bystanders_unaffected"] = not any(p.startswith("bystander") for p in problems)
        problems += check_home(home)
    figures["contained"] = sum(1 for r in figures["cases"] if r["contained"])
    figures["most_of_home_used"] = round(watch.most, 3)
    figures["most_of_home_used_mb"] = round(watch.most_mb)
    if watch.most > 0.9:
        problems.append(f"the home's filesystem reached {watch.most:.0%} full")
    figures["seconds"] = round(time.monotonic() - t0, 1)
    figures["problems"] = problems[:10]
    for row in figures["cases"]:
        print(f"{'contained' if row['contained'] else 'NOT CONTAINED':14} {row['case']:32} {row['outcome']}",
              file=sys.stderr)
    emit(figures)
    for d in (home, quiet):
        subprocess.run(["umount", "-l", str(d)], check=False)
    ok = not problems and figures["contained"] == len(figures["cases"]) and figures["cases"]
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1536, help="the tmpfs the home lives on")
    p.add_argument("--minutes", type=float, default=10, help="the most the hostile runs may take")
    p.add_argument("--no-training", action="store_true", help="leave out the reference-lab case (torch)")
    p.add_argument("--inside", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.inside:
        return inside(args, Path(args.inside))
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "bwrap", "prlimit")):
        emit({"campaign": "hostile", "skipped": "needs root, unshare, bubblewrap and prlimit (the limits under test)"})
        return 2
    tmp = temp_home("hostile")
    tmp.chmod(0o755)  # the runs' uids execute the labs' agents from their recorded copies, and read nothing here
    try:
        # a pid namespace of its own: if the campaign overruns, killing unshare ends everything it started
        cmd = ["unshare", "-m", "-p", "-f", "--kill-child", "--mount-proc", "--propagation", "private",
               sys.executable, __file__, "--size-mb", str(args.size_mb),
               "--minutes", str(args.minutes), "--inside", str(tmp)] + (["--no-training"] if args.no_training else [])
        return subprocess.run(cmd, timeout=args.minutes * 60 + 600).returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
