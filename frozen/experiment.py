"""The lab's entry point: run one experiment on a workspace and write its result JSON (frozen/README.md).

    python frozen/experiment.py --workspace workspace --result /tmp/result.json --budget 12

Exit 0 whenever a result was written, whatever its status; 2 on bad arguments or unreadable secrets;
1 if the judge itself failed (then there is no result file).
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the frozen tree must stay byte-identical to its manifest

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import data  # noqa: E402
import judge  # noqa: E402

SCHEMA = 1
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
DEFAULT_SECRETS = {"data_seed": 0, "test_secret": ""}  # public: runs by hand and tests without a home


def budget_arg(text: str) -> str:
    kind, sep, value = text.partition(":")
    try:
        if sep and kind == "steps" and int(value) > 0:
            return f"steps:{int(value)}"
        if not sep and float(text.rstrip("s")) > 0:
            return repr(float(text.rstrip("s")))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected seconds (12, 12s) or steps:N, got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run one experiment of the byte-GPT lab and write its result JSON.")
    p.add_argument("--workspace", type=Path, required=True, help="directory holding train.py")
    p.add_argument("--result", type=Path, required=True, help="where to write the result JSON")
    p.add_argument("--budget", type=budget_arg, default="12.0", help="seconds of training, or steps:N")
    p.add_argument("--timeout", type=float, default=120, help="hard limit per child, in seconds")
    p.add_argument("--seed", type=int, default=0, help="the experiment seed (init, batch order); not secret")
    p.add_argument("--source", default="synthetic", help="synthetic[:SIZE] | text:PATH | enwik8[:URL]")
    p.add_argument("--eval-bytes", type=int, default=65536, help="bytes of the validation and test splits")
    secrets = p.add_mutually_exclusive_group()
    secrets.add_argument("--secrets-fd", type=int, help="inherited descriptor to read the secrets JSON from")
    secrets.add_argument("--secrets-file", type=Path, help="secrets JSON readable by the judge's uid only")
    p.add_argument("--sandbox", default="", help="command prefix for both children; {base}, {rw} expand")
    p.add_argument("--cache", type=Path, help="the judge's private data cache (default ~/.cache/rloop-lab)")
    p.add_argument("--scratch", type=Path, help="where the experiment's scratch root is made (default $TMPDIR)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--memory-limit", type=int, metavar="MB", help="RLIMIT_AS for each child")
    p.add_argument("--log", type=Path, help="file for the children's stdout and stderr (never parsed)")
    p.add_argument("--save-model", type=Path, help="after an ok result, copy the trained model.pt here")
    p.add_argument("--warm-start", type=Path, help="a checkpoint (model.pt) train(ctx) may load: ctx.load_checkpoint()")
    return p.parse_args(argv)


def read_secrets(args) -> tuple[dict, bool]:
    if args.secrets_fd is not None:
        with os.fdopen(args.secrets_fd, "rb") as f:
            raw = f.read()
    elif args.secrets_file is not None:
        raw = args.secrets_file.read_bytes()
    else:
        return dict(DEFAULT_SECRETS), False
    secrets = json.loads(raw)
    if not isinstance(secrets.get("data_seed"), int) or not isinstance(secrets.get("test_secret"), str):
        raise ValueError("secrets must be a JSON object with an int data_seed and a str test_secret")
    return secrets, True


def mfu(device_name: str, params: int | None, tokens_per_second: float) -> float | None:
    """Model FLOPs utilisation from 6 * params FLOPs per token against the card's dense bf16 peak."""
    peak = next((v for k, v in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0]))
                 if k in device_name), None)
    if not peak or not params:
        return None
    return float(f"{6 * params * tokens_per_second / peak:.4g}")  # 4 significant digits: tiny models stay > 0


def run(args, secrets: dict, sealed: bool) -> dict:
    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.monotonic()
    result = {"schema": SCHEMA, "status": "ok", "reason": None, "val_bpb": None, "test_bpb": None,
              "oracle_bpb": None, "oracle_test_bpb": None, "train_seconds": None, "train_steps": None,
              "train_tokens": None, "peak_memory_mb": None, "params": None, "context_len": None,
              "tokens_per_second": None, "mfu": None, "eval_seconds": None, "wall_seconds": None,
              "probes": None, "probe_max_diff": None, "device": device, "device_name": None, "seed": args.seed,
              "budget": args.budget, "source": args.source, "sealed": sealed,
              "warm_started": False if args.warm_start else None}
    cache = args.cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rloop-lab"
    splits = data.load(args.source, secrets["data_seed"], secrets["test_secret"], args.eval_bytes, cache)
    result.update(oracle_bpb=splits.oracle_val, oracle_test_bpb=splits.oracle_test)
    log = open(args.log, "ab") if args.log else tempfile.TemporaryFile()
    opts = judge.Options(workspace=args.workspace, budget=args.budget, timeout=args.timeout, seed=args.seed,
                         device=device, sandbox=shlex.split(args.sandbox), memory_limit_mb=args.memory_limit,
                         log=log, scratch=args.scratch, warm_start=args.warm_start)
    eval_seed = hashlib.sha256(f"eval:{secrets['test_secret']}:{secrets['data_seed']}:{args.seed}".encode()).hexdigest()
    base = judge.prepare(opts)
    try:
        trained = judge.train(opts, base, splits.train)
        result.update({k: v for k, v in trained.items() if k in result})
        if trained["train_seconds"] > 0:
            result["tokens_per_second"] = round(trained["train_tokens"] / trained["train_seconds"], 1)
        t1 = time.monotonic()
        result.update(judge.forward(opts, base, splits, eval_seed, trained["model_sha256"]))
        result["eval_seconds"] = round(time.monotonic() - t1, 3)
        if device == "cuda" and result["tokens_per_second"]:
            result["mfu"] = mfu(result["device_name"] or "", result["params"], result["tokens_per_second"])
        if args.save_model:
            if judge.sha256(judge.sealed_model(base)) != trained["model_sha256"]:
                raise judge.ChildFailed("invalid", "forward: model.pt changed after training")
            shutil.copyfile(judge.sealed_model(base), args.save_model)
    except judge.ChildFailed as e:
        result.update(status=e.status, reason=e.reason, val_bpb=None, test_bpb=None)
    finally:
        log.close()
        shutil.rmtree(base, ignore_errors=True)
    if result["status"] == "ok":
        result["val_bpb"], result["test_bpb"] = round(result["val_bpb"], 6), round(result["test_bpb"], 6)
    result["wall_seconds"] = round(time.monotonic() - t0, 3)
    return result


def write_result(path: Path, result: dict) -> None:
    """Atomically, so a file a child wrote at the same path is replaced, never merged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        secrets, sealed = read_secrets(args)
    except (OSError, ValueError) as e:
        print(f"experiment: cannot read the secrets: {e}", file=sys.stderr)
        return 2
    if not (args.workspace / "train.py").is_file():
        print(f"experiment: {args.workspace}/train.py does not exist", file=sys.stderr)
        return 2
    if args.warm_start is not None and not args.warm_start.is_file():
        print(f"experiment: --warm-start {args.warm_start}: no such file", file=sys.stderr)
        return 2
    args.result.unlink(missing_ok=True)  # a stale or planted file must never pass for this run's result
    try:
        result = run(args, secrets, sealed)
    except data.DataError as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 1
    finally:
        judge.kill_all()
    write_result(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
