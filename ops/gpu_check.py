"""Check the lab's CUDA path on a GPU machine: one JSON line per experiment, then a verdict line.

    python ops/gpu_check.py [--device cuda] [--quick]

Needs only the standard library and torch (it runs frozen/experiment.py, as the runner does), so it works
on a bare GPU box with no rloopd installed. It runs the tiny configuration of tests/test_lab_gpu.py
(steps:30), the reference train.py under the lab's real budget (12 s), the largest model of the lab's
[params] space under the same budget, the reference under steps:60 twice with one seed, to show how
far a GPU run repeats itself, and a warm start (`WARM_START = True`, `--warm-start` the first repeat's saved
model) that must load the checkpoint on the GPU and end below the cold run. Exit 1 if any experiment did not
finish with status "ok", or the warm start did not load the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"DEPTH": 1, "WIDTH": 32, "N_HEAD": 2, "MLP_RATIO": 2, "CONTEXT": 32, "BATCH_SIZE": 8, "WARMUP": 2}
LARGE = {"DEPTH": 6, "WIDTH": 256, "N_HEAD": 8, "MLP_RATIO": 4, "CONTEXT": 512, "BATCH_SIZE": 128}
KEYS = ("status", "reason", "warm_started", "val_bpb", "oracle_bpb", "train_steps", "train_seconds",
        "tokens_per_second", "mfu", "peak_memory_mb", "params", "probes", "probe_max_diff", "device", "device_name", "eval_seconds",
        "wall_seconds", "error")


def constants(text: str, values: dict) -> str:
    for name, value in values.items():
        text, n = re.subn(rf"^{name} = [^#\n]*?(\s*#|$)", f"{name} = {value!r}\\1", text, count=1, flags=re.M)
        assert n == 1, name
    return text


def experiment(tmp: Path, label: str, values: dict, budget: str, device: str, seed: int = 0,
               warm: Path | None = None) -> dict:
    ws = tmp / label / "workspace"
    ws.mkdir(parents=True)
    (ws / "train.py").write_text(constants((ROOT / "workspace" / "train.py").read_text(), values))
    out = tmp / label / "result.json"
    cmd = [sys.executable, str(ROOT / "frozen" / "experiment.py"), "--workspace", str(ws), "--result", str(out),
           "--budget", budget, "--timeout", "300", "--seed", str(seed), "--device", device,
           "--cache", str(tmp / "cache"), "--log", str(tmp / label / "train.log"),
           "--save-model", str(tmp / label / "model.pt"), *(["--warm-start", str(warm)] if warm else [])]
    began = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    result = json.loads(out.read_text()) if out.exists() else {"status": "no-result", "error": proc.stderr[-400:]}
    line = {"check": label, "budget": budget, "seconds": round(time.monotonic() - began, 1),
            **{k: result.get(k) for k in KEYS}}
    if result.get("status") != "ok":
        log = tmp / label / "train.log"
        line["log_tail"] = log.read_text(errors="replace")[-1500:] if log.exists() else proc.stderr[-1500:]
    print(json.dumps(line), flush=True)
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="only the tiny configuration")
    args = parser.parse_args()
    try:
        import torch
        print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}), flush=True)
    except ImportError:
        print(json.dumps({"torch": None}), flush=True)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines.append(experiment(tmp, "tiny", TINY, "steps:30", args.device))
        if not args.quick:
            lines.append(experiment(tmp, "reference", {}, "12", args.device))
            lines.append(experiment(tmp, "large", LARGE, "12", args.device))
            a = experiment(tmp, "repeat-a", {}, "steps:60", args.device, seed=1)
            b = experiment(tmp, "repeat-b", {}, "steps:60", args.device, seed=1)
            lines += [a, b]
            if a["val_bpb"] is not None and b["val_bpb"] is not None:
                print(json.dumps({"check": "repeat", "val_bpb_diff": abs(a["val_bpb"] - b["val_bpb"])}), flush=True)
            warm = experiment(tmp, "warm-start", {"WARM_START": True}, "steps:60", args.device, seed=2,
                              warm=tmp / "repeat-a" / "model.pt")
            lines.append(warm)
            if not warm["warm_started"]:
                warm["status"] = "warm start not loaded"
            elif a["val_bpb"] is not None and warm["val_bpb"] is not None:
                print(json.dumps({"check": "warm-start", "cold_val_bpb": a["val_bpb"], "warm_val_bpb": warm["val_bpb"],
                                  "gain": round(a["val_bpb"] - warm["val_bpb"], 4)}), flush=True)
    ok = all(line["status"] == "ok" for line in lines)
    print(json.dumps({"verdict": "ok" if ok else "failed", "experiments": len(lines)}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
