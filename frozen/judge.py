"""The judge: runs one experiment's two children through the sandbox command and scores the model it never loads.

The judge holds the splits and the secrets; its children get only what this module sends them: training
batches (counted and cut off here, so the budget binds), then input windows whose logits come back over a
pipe. Cross-entropy is computed here in float32 (evaluate.py); children's stdout goes to the log and is
never parsed. Children run in their own session and are killed as a group at the hard timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import evaluate
import torch

# The judge's arithmetic is light, and idle OpenMP threads spinning here would slow the children down.
torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
MAX_BATCH_BYTES = 1 << 24      # one training batch: at most 16 MiB of bytes
CHILD_ENV_PASS = ("PATH", "LANG", "LC_ALL", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ChildFailed(Exception):
    """A child ended the experiment early; `status` is the experiment's status."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Options:
    workspace: Path
    budget: str                      # "steps:N" or seconds
    timeout: float                   # hard limit per child, seconds from its start
    seed: int
    device: str
    sandbox: list[str] = field(default_factory=list)
    memory_limit_mb: int | None = None
    log: object = None               # a binary file the children's stdout and stderr go to
    scratch: Path | None = None
    warm_start: Path | None = None   # a checkpoint (a model.pt of this lab) offered to train(ctx)


# --- I/O with deadlines: a child that stops reading or writing must not hang the judge ---

def _wait_fd(fd: int, write: bool, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    r, w, _ = select.select([] if write else [fd], [fd] if write else [], [], left)
    if not (r or w):
        raise TimeoutError


def write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    while view:
        _wait_fd(fd, True, deadline)
        try:
            view = view[os.write(fd, view[: 1 << 20]):]
        except BlockingIOError:
            continue


def read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        _wait_fd(fd, False, deadline)
        try:
            chunk = os.read(fd, min(n - len(buf), 1 << 22))
        except BlockingIOError:
            continue
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def send(fd: int, kind: bytes, payload: bytes, deadline: float) -> None:
    write_all(fd, kind + struct.pack("<I", len(payload)) + payload, deadline)


def recv_header(fd: int, deadline: float) -> tuple[bytes, int]:
    kind, n = struct.unpack("<cI", read_exact(fd, 5, deadline))
    return kind, n


# --- children ---

LIVE: list[Child] = []


def kill_all() -> None:
    """Kill every child's session: the judge is leaving, whatever happened."""
    for child in LIVE:
        child.kill()


class Child:
    """One child process: its own session, a minimal environment, two pipes, rusage on exit."""

    def __init__(self, opts: Options, base: Path, mode: str, rw: Path, extra: list[str], deadline: float):
        j_rx, c_tx = os.pipe()
        c_rx, j_tx = os.pipe()
        for fd in (j_rx, j_tx):
            os.set_blocking(fd, False)
        prefix = [a.replace("{base}", str(base)).replace("{rw}", str(rw)) for a in opts.sandbox]
        cmd = prefix + [sys.executable, "-I", "-B", str(base / "share" / "child.py"), mode,
                        "--workspace", str(base / "workspace"), "--rx", str(c_rx), "--tx", str(c_tx),
                        "--device", opts.device, *extra]
        env = {k: os.environ[k] for k in CHILD_ENV_PASS if k in os.environ}
        env.update(HOME=str(rw), TMPDIR=str(rw), PYTHONHASHSEED="0")
        limit = opts.memory_limit_mb

        def preexec():  # runs in the child between fork and exec; the limit survives the sandbox's execs
            if limit:
                resource.setrlimit(resource.RLIMIT_AS, (limit << 20, limit << 20))

        out = opts.log.fileno() if opts.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                     cwd=str(rw), pass_fds=(c_rx, c_tx), start_new_session=True,
                                     preexec_fn=preexec)
        LIVE.append(self)
        os.close(c_rx)
        os.close(c_tx)
        self.rx, self.tx, self.deadline = j_rx, j_tx, deadline
        self.timed_out = False
        self.killed = False  # by the judge, for a reason of its own
        self.maxrss_mb: float | None = None

    def kill(self) -> None:
        if self.proc.returncode is not None:  # reaped: its group was killed then; the pid may be reused
            return
        self.killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self, grace: float | None = None) -> int:
        """Wait for exit until the deadline (or grace seconds), killing the group then; returns the exit code."""
        until = self.deadline if grace is None else min(self.deadline, time.monotonic() + grace)
        while self.proc.returncode is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.maxrss_mb = usage.ru_maxrss / 1024
                break
            if time.monotonic() >= until:
                self.timed_out = self.timed_out or time.monotonic() >= self.deadline
                self.kill()
                until = float("inf")
            time.sleep(0.01)
        try:  # whatever it left behind in its session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for fd in (self.rx, self.tx):
            try:
                os.close(fd)
            except OSError:
                pass
        return self.proc.returncode

    def failure(self, phase: str) -> ChildFailed:
        rc = self.reap(grace=5)
        if self.timed_out:
            return ChildFailed("timeout", f"{phase}: killed at the hard timeout")
        if rc == 3:
            return ChildFailed("oom", f"{phase}: out of memory")
        if rc == -signal.SIGKILL and not self.killed:
            return ChildFailed("oom", f"{phase}: killed by SIGKILL (the kernel's OOM killer?)")
        if rc == 4 or (phase == "forward" and rc == 1):
            return ChildFailed("invalid", f"{phase}: malformed model (see the log)")
        return ChildFailed("crashed", f"{phase}: exited with {rc}")


def prepare(opts: Options) -> Path:
    """The experiment's scratch root {base}: share/ (child.py), a copy of the workspace, model/ and tmp/."""
    base = Path(tempfile.mkdtemp(prefix="rloop-exp-", dir=opts.scratch))
    base.chmod(0o755)
    (base / "share").mkdir(mode=0o755)
    shutil.copy(HERE / "child.py", base / "share" / "child.py")
    shutil.copytree(opts.workspace, base / "workspace", symlinks=False,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    for d in [base / "workspace", *sorted((base / "workspace").rglob("*"))]:
        d.chmod(0o755 if d.is_dir() else 0o644)
    if opts.warm_start is not None:  # a read-only copy: train(ctx) may load it, never change the original
        (base / "warm").mkdir(mode=0o755)
        shutil.copyfile(opts.warm_start, base / "warm" / "checkpoint.pt")
        (base / "warm" / "checkpoint.pt").chmod(0o444)
    for name in ("model", "tmp"):
        (base / name).mkdir()
        (base / name).chmod(0o777)  # the children's uid is the sandbox's business; it must be able to write
    return base


# --- the two phases ---

def train(opts: Options, base: Path, train_bytes: bytes) -> dict:
    """Serve batches until the budget is spent; returns steps, tokens, seconds, peak memory and device."""
    deadline = time.monotonic() + opts.timeout
    warm = ["--warm-start", str(base / "warm" / "checkpoint.pt")] if opts.warm_start is not None else []
    child = Child(opts, base, "train", base / "model",
                  ["--out", str(base / "model"), "--seed", str(opts.seed), "--budget", opts.budget, *warm], deadline)
    kind, _, value = opts.budget.partition(":")
    max_steps = int(value) if kind == "steps" else None
    max_seconds = None if kind == "steps" else float(opts.budget)
    rng = random.Random(f"batches:{opts.seed}")
    steps = tokens = 0
    first = ended = None
    info: dict = {}
    try:
        while True:
            kind, n = recv_header(child.rx, deadline)
            if n > 1 << 16:
                raise ChildFailed("crashed", "train: broke the batch protocol")
            payload = read_exact(child.rx, n, deadline)
            now = time.monotonic()
            if kind == b"D":
                ended = now
                info = json.loads(payload or b"{}")
                continue
            if kind != b"B" or len(payload) != 8:
                raise ChildFailed("crashed", "train: broke the batch protocol")
            b, t = struct.unpack("<II", payload)
            if b < 1 or t < 1 or b * (t + 1) > MAX_BATCH_BYTES or t + 1 >= len(train_bytes):
                send(child.tx, b"e", f"batch {b} x {t} is out of bounds".encode(), deadline)
                continue
            if (max_steps is not None and steps >= max_steps) or (
                    max_seconds is not None and first is not None and now - first >= max_seconds):
                send(child.tx, b"s", b"", deadline)
                continue
            first = first or now
            offsets = [rng.randrange(len(train_bytes) - t - 1) for _ in range(b)]
            send(child.tx, b"b", b"".join(train_bytes[o:o + t + 1] for o in offsets), deadline)
            steps, tokens = steps + 1, tokens + b * t
    except (EOFError, TimeoutError, BrokenPipeError):
        pass  # the child closed its end or stopped talking: reap() tells an exit from a timeout
    except ChildFailed:
        child.kill()
        child.reap(grace=1)
        raise
    except ValueError:  # a malformed JSON message
        child.kill()
        child.reap(grace=1)
        raise ChildFailed("crashed", "train: sent a malformed message") from None
    rc = child.reap()
    if rc != 0 or child.timed_out:
        raise child.failure("train")
    if not (base / "model" / "model.pt").is_file() or ended is None:
        raise ChildFailed("invalid", "train: no model was saved")
    model_sha = seal(base)
    seconds = (ended - first) if first is not None else 0.0
    cuda_peak = info.get("cuda_peak_mb")
    return {"model_sha256": model_sha, "train_steps": steps, "train_tokens": tokens, "train_seconds": round(seconds, 3),
            "peak_memory_mb": round(float(cuda_peak if isinstance(cuda_peak, (int, float)) else child.maxrss_mb), 1),
            "device_name": str(info.get("device_name", ""))[:100],
            "warm_started": bool(info.get("warm_started")) if opts.warm_start is not None else None}


def seal(base: Path) -> str:
    """Move the trained model out of the children's reach: a judge-owned, read-only copy in sealed/.

    The train child's model/ directory is removed, so nothing a child can write (or touch: a changed
    mtime is a message too) is read by a later child or kept as the run's checkpoint.
    """
    sealed = base / "sealed"
    sealed.mkdir(mode=0o755)
    try:  # never follow a link the child planted: the judge may be able to read what the child cannot
        fd = os.open(base / "model" / "model.pt", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise ChildFailed("invalid", "train: model.pt is not a regular file") from None
    with os.fdopen(fd, "rb") as src:
        st = os.fstat(src.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ChildFailed("invalid", "train: model.pt is not a regular file")
        with open(sealed / "model.pt", "wb") as dst:
            shutil.copyfileobj(src, dst)
    (sealed / "model.pt").chmod(0o444)
    shutil.rmtree(base / "model")
    return sha256(sealed / "model.pt")


def sealed_model(base: Path) -> Path:
    return base / "sealed" / "model.pt"


class Forward:
    """The forward children, one per evaluation part, started one after the other.

    A probe and the window it was cut from are always sent to different children, and nothing a child
    could write survives it ({rw} is emptied, model.pt must keep its hash), so a model that remembers
    what it saw cannot make a probe agree with its original: it never saw the original.
    """

    def __init__(self, opts: Options, base: Path, model_sha: str):
        self.opts, self.base, self.model_sha = opts, base, model_sha
        self.child: Child | None = None
        self.part: int | None = None
        self.hello: dict | None = None

    def start(self, part: int) -> dict:
        self.close()
        rw = self.base / "tmp"
        shutil.rmtree(rw, ignore_errors=True)
        rw.mkdir()
        rw.chmod(0o777)
        if sha256(sealed_model(self.base)) != self.model_sha:
            raise ChildFailed("invalid", "forward: model.pt changed after training")
        deadline = time.monotonic() + self.opts.timeout
        self.child = Child(self.opts, self.base, "forward", rw,
                           ["--model", str(sealed_model(self.base))], deadline)
        self.part = part
        kind, n = recv_header(self.child.rx, deadline)
        hello = json.loads(read_exact(self.child.rx, n, deadline)) if kind == b"H" and n < 1 << 16 else None
        if not isinstance(hello, dict) or not isinstance(hello.get("context_len"), int):
            raise ChildFailed("invalid", "forward: no model announcement")
        if self.hello is not None and hello["context_len"] != self.hello["context_len"]:
            raise ChildFailed("invalid", "forward: the model announced another context_len the second time")
        self.hello = self.hello or hello
        return hello

    def ask(self, part: int, batch: list[bytes]) -> bytes:
        if part != self.part:
            self.start(part)
        child, deadline, t = self.child, self.child.deadline, len(batch[0])
        send(child.tx, b"X", struct.pack("<II", len(batch), t) + b"".join(batch), deadline)
        kind, n = recv_header(child.rx, deadline)
        if kind != b"L" or n != 12 + len(batch) * t * evaluate.VOCAB * 4:
            raise ChildFailed("invalid", f"forward: the model returned a wrong shape or message for a "
                                         f"({len(batch)}, {t}) batch")
        shape = struct.unpack("<III", read_exact(child.rx, 12, deadline))
        if shape != (len(batch), t, evaluate.VOCAB):
            raise ChildFailed("invalid", f"forward: logits of shape {shape}, expected {(len(batch), t, 256)}")
        return read_exact(child.rx, n - 12, deadline)

    def close(self) -> None:
        if self.child is not None and self.child.proc.returncode is None:
            try:
                send(self.child.tx, b"X", struct.pack("<II", 0, 0), time.monotonic() + 5)
            except (TimeoutError, BrokenPipeError, OSError):
                pass
            self.child.reap(grace=5)
        self.child = None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def forward(opts: Options, base: Path, splits, eval_seed: str, model_sha: str) -> dict:
    """Ask the forward children for logits of every window and every probe; score them here."""
    fwd = Forward(opts, base, model_sha)
    try:
        hello = fwd.start(0)
        result = evaluate.score(fwd.ask, splits, hello["context_len"], random.Random(eval_seed), opts.device)
        fwd.close()
    except (EOFError, TimeoutError, BrokenPipeError, ValueError):
        if fwd.child is None:
            raise ChildFailed("crashed", "forward: the judge lost its child") from None
        raise fwd.child.failure("forward") from None
    except evaluate.Invalid as e:
        raise ChildFailed("invalid", str(e)) from None
    finally:
        if fwd.child is not None:
            fwd.child.kill()
            fwd.child.reap(grace=1)
    params = hello.get("params")
    result.update(params=params if isinstance(params, int) else None, context_len=hello["context_len"])
    return result
