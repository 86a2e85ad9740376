"""Fork latency at the latest step of a run of 1,000 events and of one of 1,000,000, and their ratio.

Both runs come from ops/bench/synthetic.py, in the same shape (sessions act ~200 times per experiment, so
the large run has ~4,900 experiments). A fork is all of `rloopd fork`'s work, in-process (`fork_run`): find
the fork position, fold the prefix (from the nearest fold snapshot), append run.created (synchronous=FULL),
restore the workspace, write frozen/ and re-project memory (program.md, results.tsv, notes.md, the
checkpoint). The two homes take turns in the same process and the medians are reported, with a fork in the
middle of the large run beside them (a fork costs the same at any step). Prints one JSON line.

    python ops/bench/fork.py [--rounds 9] [--small 1000] [--large 1000000]
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

from rloopd.fork import fork_run
from rloopd.history import run_state
from rloopd.home import Home


def fork_ms(home: Home, run: str, step: int) -> float:
    t0 = time.perf_counter()
    fork_run(home, run, step, experiments=1)
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--small", type=int, default=1_000)
    p.add_argument("--large", type=int, default=1_000_000)
    p.add_argument("--dir", type=Path, default=None, help="where the copied homes go (default: a temp dir)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        (small_dir, small_run), (large_dir, large_run) = (cached(Shape(n), Path(tmp)) for n in (a.small, a.large))
        with Home.open(small_dir) as small, Home.open(large_dir) as large:
            last = {h: run_state(h.log, r).step for h, r in ((small, small_run), (large, large_run))}
            sides = [("small", small, small_run, last[small]), ("large", large, large_run, last[large]),
                     ("large_mid", large, large_run, last[large] // 2)]
            times: dict[str, list[float]] = {name: [] for name, *_ in sides}
            for _, home, run, step in sides:  # warm-up: imports, page cache, the first snapshot read
                fork_ms(home, run, step)
            for r in range(a.rounds):
                for name, home, run, step in sides if r % 2 == 0 else sides[::-1]:
                    times[name].append(fork_ms(home, run, step))
            sizes = {name: home.log.head(run)[0] + 1 for name, home, run, _ in sides}
    med = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "bench": "fork", "rounds": a.rounds, "events_small": sizes["small"], "events_large": sizes["large"],
        "experiments_large": last[large], "fork_ms_small": round(med["small"], 2),
        "fork_ms_large": round(med["large"], 2), "ratio": round(med["large"] / med["small"], 3),
        "fork_ms_large_mid_step": round(med["large_mid"], 2),
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
