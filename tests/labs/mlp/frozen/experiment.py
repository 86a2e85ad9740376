"""The mlp lab's entry point and judge: run one experiment on a workspace and write its result JSON.

    python frozen/experiment.py --workspace workspace --result /tmp/result.json --budget steps:200

One child (child.py, started through the --sandbox prefix) imports workspace/train.py, runs train(ctx) on
training batches that this process serves and counts, saves the model, then labels validation and hidden
test inputs sent shuffled together and without their labels. Accuracy is computed here, where no agent code
runs; the data seed and the test secret never leave this process. See frozen/README.md for the contract.

Exit 0 whenever a result was written, whatever its status; 2 on bad arguments or unreadable secrets.
"""

from __future__ import annotations

import sys

sys.dont_write_bytecode = True  # the frozen tree must stay byte-identical to its manifest

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "private"))
import teacher  # noqa: E402

SCHEMA = 1
TRAIN_SIZE = 4096  # training examples (synthetic:N changes it)
EVAL_SIZE = 2048  # validation and test examples each
MAX_BATCH = 65536
DEFAULT_SECRETS = {"data_seed": 0, "test_secret": ""}  # public: runs by hand and tests without a home
CHILD_ENV_PASS = ("PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class Failed(Exception):
    """The experiment ended without a score; `status` is its status (crashed, oom, timeout, invalid)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def budget_arg(text: str) -> str:
    kind, sep, value = text.partition(":")
    try:
        if sep and kind == "steps" and int(value) > 0:
            return f"steps:{int(value)}"
        if not sep and float(text.rstrip("s")) > 0:
            return repr(float(text.rstrip("s")))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected seconds (2, 2s) or steps:N, got {text!r}")


def source_arg(text: str) -> int:
    kind, sep, value = text.partition(":")
    if kind == "synthetic" and (not sep or (value.isdigit() and int(value) > 0)):
        return int(value) if sep else TRAIN_SIZE
    raise argparse.ArgumentTypeError(f"expected synthetic or synthetic:TRAIN_SIZE, got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Run one experiment of the mlp lab and write its result JSON.")
    p.add_argument("--workspace", type=Path, required=True, help="directory holding train.py")
    p.add_argument("--result", type=Path, required=True, help="where to write the result JSON")
    p.add_argument("--budget", type=budget_arg, default="steps:200", help="steps:N batches, or seconds")
    p.add_argument("--timeout", type=float, default=30, help="hard limit for the child, in seconds")
    p.add_argument("--seed", type=int, default=0, help="the experiment seed (init, batch order); not secret")
    p.add_argument("--source", type=source_arg, default=TRAIN_SIZE, help="synthetic[:TRAIN_SIZE]")
    secrets = p.add_mutually_exclusive_group()
    secrets.add_argument("--secrets-fd", type=int, help="inherited descriptor to read the secrets JSON from")
    secrets.add_argument("--secrets-file", type=Path, help="secrets JSON readable by the judge's uid only")
    p.add_argument("--sandbox", default="", help="command prefix for the child; {base}, {rw} expand")
    p.add_argument("--scratch", type=Path, help="where the experiment's scratch root is made (default $TMPDIR)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto means cpu here")
    p.add_argument("--memory-limit", type=int, metavar="MB", help="RLIMIT_AS for the child")
    p.add_argument("--log", type=Path, help="file for the child's stdout and stderr (never parsed)")
    p.add_argument("--save-model", type=Path, help="after an ok result, copy the trained model.pt here")
    p.add_argument("--cache", type=Path, help="accepted for the runner; this lab keeps no cache")
    p.add_argument("--warm-start", type=Path, help="accepted for the runner; this lab does not warm-start")
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


def rng(*words: object) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(":".join(map(str, words)).encode()).digest()[:8], "little"))


# --- I/O with deadlines: a child that stops reading or writing must not hang the judge ---

def _wait(fd: int, write: bool, deadline: float) -> None:
    left = deadline - time.monotonic()
    r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], max(left, 0))
    if not (r or w):
        raise TimeoutError


def send(fd: int, kind: bytes, payload: bytes, deadline: float) -> None:
    view = memoryview(kind + struct.pack("<I", len(payload)) + payload)
    while view:
        _wait(fd, True, deadline)
        try:
            view = view[os.write(fd, view[: 1 << 20]):]
        except BlockingIOError:
            continue


def read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        _wait(fd, False, deadline)
        try:
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
        except BlockingIOError:
            continue
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def recv(fd: int, deadline: float, limit: int) -> tuple[bytes, bytes]:
    kind, n = struct.unpack("<cI", read_exact(fd, 5, deadline))
    if n > limit:
        raise Failed("crashed", "the child broke the protocol")
    return kind, read_exact(fd, n, deadline)


class Child:
    """The child: its own session, a minimal environment, two pipes; killed as a group at its deadline."""

    def __init__(self, args, base: Path, device: str):
        rw = base / "model"
        j_rx, c_tx = os.pipe()
        c_rx, j_tx = os.pipe()
        for fd in (j_rx, j_tx):
            os.set_blocking(fd, False)
        prefix = [w.replace("{base}", str(base)).replace("{rw}", str(rw)) for w in shlex.split(args.sandbox)]
        cmd = prefix + [sys.executable, "-I", "-B", str(base / "share" / "child.py"),
                        "--workspace", str(base / "workspace"), "--rx", str(c_rx), "--tx", str(c_tx),
                        "--out", str(rw), "--device", device, "--seed", str(args.seed), "--budget", args.budget,
                        "--features", str(teacher.FEATURES), "--classes", str(teacher.CLASSES)]
        env = {k: os.environ[k] for k in CHILD_ENV_PASS if k in os.environ}
        env.update(HOME=str(rw), TMPDIR=str(rw), PYTHONHASHSEED="0")
        limit = args.memory_limit

        def preexec():  # between fork and exec; the limit survives the sandbox's own execs
            if limit:
                resource.setrlimit(resource.RLIMIT_AS, (limit << 20, limit << 20))

        self.log = open(args.log, "ab") if args.log else None
        out = self.log.fileno() if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=str(rw),
                                     pass_fds=(c_rx, c_tx), start_new_session=True, preexec_fn=preexec)
        os.close(c_rx)
        os.close(c_tx)
        self.rx, self.tx = j_rx, j_tx
        self.deadline = time.monotonic() + args.timeout
        self.killed = self.timed_out = False
        self.maxrss_mb: float | None = None

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.killed = True
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> int:
        """Wait for the exit until the deadline, killing the group then; the exit code."""
        while self.proc.returncode is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.maxrss_mb = usage.ru_maxrss / 1024
                break
            if time.monotonic() >= self.deadline and not self.killed:
                self.timed_out = True
                self.kill()
            time.sleep(0.005)
        try:  # whatever it left behind in its session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for fd in (self.rx, self.tx):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.log:
            self.log.close()
        return self.proc.returncode

    def failure(self) -> Failed:
        rc = self.proc.returncode
        if self.timed_out:
            return Failed("timeout", "the child outlived --timeout")
        if rc == 3:
            return Failed("oom", "out of memory")
        if rc == -signal.SIGKILL and not self.killed:
            return Failed("oom", "killed by SIGKILL (the kernel's OOM killer?)")
        if rc == 4:
            return Failed("invalid", "malformed model or output (see the log)")
        return Failed("crashed", f"the child exited with {rc}")


def prepare(args) -> Path:
    """The scratch root {base}: share/child.py, a copy of the workspace (read-only to the child), model/."""
    base = Path(tempfile.mkdtemp(prefix="rloop-mlp-", dir=args.scratch))
    base.chmod(0o755)
    (base / "share").mkdir(mode=0o755)
    shutil.copy(HERE / "child.py", base / "share" / "child.py")
    shutil.copytree(args.workspace, base / "workspace", symlinks=False,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    for d in [base / "workspace", *sorted((base / "workspace").rglob("*"))]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    (base / "model").mkdir()
    (base / "model").chmod(0o777)  # the child's uid is the sandbox's business; it must be able to write
    return base


def experiment(args, child: Child, splits: dict, order_key: str, result: dict) -> None:
    """Serve batches until the budget is spent, then score the child's labels, filling in `result` as it
    goes (so a failure after training still reports the training's numbers)."""
    x_train, y_train = splits["train"]
    draw = rng("batches", args.seed)
    kind, _, value = args.budget.partition(":")
    max_steps = int(value) if kind == "steps" else None
    max_seconds = None if kind == "steps" else float(args.budget)
    steps = examples = 0
    first = None
    deadline = child.deadline
    while True:
        kind, payload = recv(child.rx, deadline, 1 << 16)
        if kind == b"D":
            break
        if kind != b"B" or len(payload) != 4:
            raise Failed("crashed", "the child broke the protocol")
        (b,) = struct.unpack("<I", payload)
        now = time.monotonic()
        if not 1 <= b <= MAX_BATCH:
            send(child.tx, b"e", f"batch size {b} is outside 1..{MAX_BATCH}".encode(), deadline)
        elif (max_steps is not None and steps >= max_steps) or (
                max_seconds is not None and first is not None and now - first >= max_seconds):
            send(child.tx, b"s", b"", deadline)
        else:
            first = first or now
            idx = draw.integers(0, len(x_train), size=b)
            send(child.tx, b"b", x_train[idx].tobytes() + y_train[idx].tobytes(), deadline)
            steps, examples = steps + 1, examples + b
    ended = time.monotonic()
    info = json.loads(payload or b"{}")
    params = info.get("params") if isinstance(info, dict) else None
    result.update(train_steps=steps, train_examples=examples,
                  train_seconds=round(ended - first, 3) if first is not None else 0.0,
                  params=params if isinstance(params, int) else None)
    x_eval = np.concatenate([splits["val"][0], splits["test"][0]])
    y_eval = np.concatenate([splits["val"][1], splits["test"][1]])
    perm = rng("order", order_key, args.seed).permutation(len(x_eval))  # val and test, indistinguishable
    send(child.tx, b"X", struct.pack("<I", len(x_eval)) + x_eval[perm].tobytes(), deadline)
    kind, payload = recv(child.rx, deadline, len(x_eval))
    if kind != b"P" or len(payload) != len(x_eval):
        raise Failed("invalid", f"the child returned {len(payload)} labels for {len(x_eval)} inputs")
    labels = np.empty(len(x_eval), dtype=np.uint8)
    labels[perm] = np.frombuffer(payload, dtype=np.uint8)
    if labels.max(initial=0) >= teacher.CLASSES:
        raise Failed("invalid", f"the child returned a label outside 0..{teacher.CLASSES - 1}")
    correct = labels == y_eval
    n_val = len(splits["val"][0])
    result.update(val_accuracy=round(float(correct[:n_val].mean()), 6),
                  test_accuracy=round(float(correct[n_val:].mean()), 6), eval_seconds=round(time.monotonic() - ended, 3))


def copy_model(base: Path, dest: Path) -> None:
    """Copy the child's model.pt, never following a link it planted (the judge may read what it cannot)."""
    try:
        fd = os.open(base / "model" / "model.pt", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise Failed("invalid", "no model was saved") from None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise Failed("invalid", "model.pt is not a regular file")
        with open(dest, "wb") as out:
            shutil.copyfileobj(src, out)


def run(args, secrets: dict, sealed: bool) -> dict:
    t0 = time.monotonic()
    device = "cpu" if args.device == "auto" else args.device
    result = {"schema": SCHEMA, "status": "ok", "reason": None, "val_accuracy": None, "test_accuracy": None,
              "train_steps": None, "train_examples": None, "train_seconds": None, "peak_memory_mb": None,
              "params": None, "eval_seconds": None, "wall_seconds": None, "device": device, "seed": args.seed,
              "budget": args.budget, "source": f"synthetic:{args.source}", "sealed": sealed,
              "warm_started": False if args.warm_start else None}  # offered checkpoints are not used here
    splits = teacher.splits(secrets["data_seed"], secrets["test_secret"], args.source, EVAL_SIZE)
    base = prepare(args)
    child = Child(args, base, device)
    try:
        try:
            experiment(args, child, splits, f"{secrets['test_secret']}:{secrets['data_seed']}", result)
        except (EOFError, TimeoutError, BrokenPipeError, ValueError, struct.error):
            if child.reap() == 0 and not child.timed_out:
                raise Failed("invalid", "the child ended without labelling the inputs") from None
            raise child.failure() from None
        except Failed:
            child.kill()
            child.reap()
            raise
        if child.reap() != 0 or child.timed_out:
            raise child.failure()
        if args.save_model:
            copy_model(base, args.save_model)
    except Failed as e:
        result.update(status=e.status, reason=e.reason, val_accuracy=None, test_accuracy=None)
    finally:
        child.kill()
        if child.proc.returncode is None:
            child.reap()
        shutil.rmtree(base, ignore_errors=True)
    result["peak_memory_mb"] = round(child.maxrss_mb, 1) if child.maxrss_mb else None
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
    args.result.unlink(missing_ok=True)  # a stale or planted file must never pass for this run's result
    write_result(args.result, run(args, secrets, sealed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
