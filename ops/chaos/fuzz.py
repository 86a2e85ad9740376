"""Input fuzzing at length: the hypothesis fuzzers of tests/test_fuzz.py, with many more examples.

    python ops/chaos/fuzz.py [--examples 500] [--budget 240] [--seed 0]

The fuzzers cover every input a user, an agent or a sender controls: a lab's rloop.toml, batch files,
control-socket requests, a run socket's requests and `rloopd submit` arguments, `rloopd import` archives,
and event rows read back from the log (tests/test_fuzz.py says what each one checks). The suite runs a few
dozen derandomized examples of each; here each fuzzer runs in its own pytest process with
RLOOPD_FUZZ_EXAMPLES set and hypothesis seeded with --seed, so the examples differ from CI's.

The fuzzers differ a lot in cost (a control request is answered in a millisecond; a damaged log costs a
copy of a home and four commands), so each first runs its default examples to measure what one costs, then
gets --examples, or as many as fit its share of --budget seconds. Prints one JSON line: cases fuzzed,
examples run (both passes), failures (cases with a failing example; must be 0), and examples per case.
A failing case's pytest output (with hypothesis's reproduction blob) goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, emit, temp_home  # noqa: E402

TESTS = ROOT / "tests" / "test_fuzz.py"


def fuzzers() -> list[str]:
    """The names of the `@given` tests of tests/test_fuzz.py."""
    sys.path.insert(0, str(ROOT))
    import tests.test_fuzz as module

    return [name for name, fn in vars(module).items() if name.startswith("test_") and hasattr(fn, "hypothesis")]


def run_case(name: str, examples: int | None, seed: int, stats: Path, timeout: float) -> tuple[bool, str]:
    """One fuzzer in a pytest process of its own: (passed, its output)."""
    env = {**os.environ, "RLOOPD_FUZZ_STATS": str(stats), "RLOOPD_FUZZ_SEED": str(seed)}
    if examples is not None:
        env["RLOOPD_FUZZ_EXAMPLES"] = str(examples)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
           "-o", f"timeout={int(timeout)}", f"{TESTS}::{name}"]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout + 60)
    except subprocess.TimeoutExpired as e:
        return False, f"{name}: no result within {timeout + 60:.0f} s\n{e.stdout or ''}"
    return proc.returncode == 0, proc.stdout + proc.stderr


def examples_in(stats: Path) -> list[float]:
    """When each example recorded in `stats` began (monotonic seconds)."""
    if not stats.exists():
        return []
    return [float(line.split("\t")[1]) for line in stats.read_text().splitlines() if "\t" in line]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=500, help="examples per fuzzer (fewer where the budget says)")
    p.add_argument("--budget", type=float, default=240.0, help="seconds for the long pass, shared by the fuzzers")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    began = time.monotonic()
    tmp = temp_home("fuzz")
    names = fuzzers()
    share = args.budget / len(names)
    total, failed, per_case = 0, [], {}
    try:
        for name in names:
            calibration = tmp / f"{name}.calibrate"
            ok, output = run_case(name, None, args.seed, calibration, timeout=300)
            stamps = examples_in(calibration)
            total += len(stamps)
            if not ok:
                failed.append(name)
                print(output, file=sys.stderr)
                per_case[name] = len(stamps)
                continue
            each = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 1.0
            wanted = max(1, min(args.examples, int(share / max(each, 1e-3))))
            stats = tmp / f"{name}.stats"
            ok, output = run_case(name, wanted, args.seed, stats, timeout=max(60.0, 3 * share))
            done = len(examples_in(stats))
            total += done
            per_case[name] = len(stamps) + done
            if not ok:
                failed.append(name)
                print(output, file=sys.stderr)
        emit({"campaign": "fuzz", "cases": len(names), "examples": total, "failures": len(failed),
              "failed": failed, "seed": args.seed, "examples_per_case": per_case,
              "seconds": round(time.monotonic() - began, 1)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
