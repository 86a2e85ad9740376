"""The two children of one experiment: `train` runs train(ctx) and saves the model, `forward` answers the judge's windows with logits.

Agent code runs in both, so nothing here is trusted: the judge copies this file into the experiment's
scratch directory, starts it through the sandbox command, counts the batches it serves and computes
every metric itself from the logits it receives. This file imports only torch and the standard library.

Wire format on the two descriptors the judge passes (--rx reads, --tx writes): a message is one kind
byte, a little-endian uint32 payload length, then the payload.
  train:   child B(batch, ctx) -> judge b(bytes of batch x (ctx+1)) | s(stop) | e(error text);
           child D(json: device name, CUDA peak) once train(ctx) has returned.
  forward: child H(json: context_len, params) once the model is loaded;
           judge X(batch, len, bytes) -> child L(batch, len, vocab, float32 logits); judge X(0, 0) ends.
Exit codes: 0 ok, 1 crashed (an exception), 3 out of memory, 4 invalid (malformed model or return value).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import random
import struct
import sys
import time
import traceback

EXIT_OK, EXIT_CRASHED, EXIT_OOM, EXIT_INVALID = 0, 1, 3, 4
VOCAB = 256


class Invalid(Exception):
    """The model or train()'s return value breaks the contract (frozen/README.md)."""


def send(fd: int, kind: bytes, payload: bytes = b"") -> None:
    data = memoryview(kind + struct.pack("<I", len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def recv_exact(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the judge closed the channel")
        buf += chunk
    return bytes(buf)


def recv(fd: int) -> tuple[bytes, bytes]:
    kind, n = struct.unpack("<cI", recv_exact(fd, 5))
    return kind, recv_exact(fd, n)


class Context:
    """What train(ctx) receives: training batches, the budget clock, the device and the seed.

    ctx.batches(batch_size, context) yields (x, y) int64 tensors of shape (batch_size, context) on
    ctx.device, y being x shifted by one byte, until the budget is spent. ctx.progress() is the spent
    fraction of the budget in [0, 1] (steps served / N, or seconds since the first batch / budget).
    """

    vocab_size = VOCAB

    def __init__(self, rx: int, tx: int, budget: str, device: str, seed: int, checkpoint: str | None = None):
        import torch
        self._torch, self._rx, self._tx = torch, rx, tx
        self.device, self.seed, self.budget = device, seed, budget
        self.checkpoint = checkpoint  # the run's best model, when the run offers one (memory/checkpoint.pt)
        self.warm_started = False     # load_checkpoint() was called: the result records it
        kind, _, value = budget.partition(":")
        self.max_steps = int(value) if kind == "steps" else None
        self.max_seconds = None if kind == "steps" else float(budget)
        self.step = 0          # batches received so far
        self.started = None    # monotonic time of the first batch
        self.stopped = False   # the judge said the budget is spent

    def load_checkpoint(self):
        """The offered checkpoint (the nn.Module a previous train(ctx) returned) on ctx.device, or None when
        the run offers none. Its classes are found in this train.py, so they must still exist by name."""
        if self.checkpoint is None:
            return None
        model = self._torch.load(self.checkpoint, map_location="cpu", weights_only=False).to(self.device)
        self.warm_started = True
        return model

    def batch(self, batch_size: int, context: int):
        """One (x, y) batch, or None once the budget is spent."""
        if self.stopped:
            return None
        send(self._tx, b"B", struct.pack("<II", batch_size, context))
        kind, payload = recv(self._rx)
        if kind == b"s":
            self.stopped = True
            return None
        if kind != b"b":
            raise RuntimeError(f"the judge refused the batch: {payload.decode(errors='replace')}")
        if self.started is None:
            self.started = time.monotonic()
        self.step += 1
        torch = self._torch
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(batch_size, context + 1).long()
        if self.device.startswith("cuda"):
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        return buf[:, :-1], buf[:, 1:]

    def batches(self, batch_size: int, context: int):
        while (b := self.batch(batch_size, context)) is not None:
            yield b

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.monotonic() - self.started

    def progress(self) -> float:
        if self.stopped:
            return 1.0
        if self.max_steps is not None:
            return min(1.0, self.step / self.max_steps)
        return min(1.0, self.elapsed() / self.max_seconds)

    def should_stop(self) -> bool:
        return self.stopped or self.progress() >= 1.0


def import_train(workspace: str):
    """Import workspace/train.py as module `train`, so a pickled model finds its classes again."""
    sys.path.insert(0, workspace)
    spec = importlib.util.spec_from_file_location("train", os.path.join(workspace, "train.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["train"] = module
    spec.loader.exec_module(module)
    return module


def check_model(model):
    import torch
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module; save the original
    if not isinstance(model, torch.nn.Module):
        raise Invalid(f"train(ctx) must return an nn.Module, got {type(model).__name__}")
    ctx_len = getattr(model, "context_len", None)
    if not isinstance(ctx_len, int) or isinstance(ctx_len, bool) or ctx_len < 1:
        raise Invalid(f"the model must declare context_len, a positive int; got {ctx_len!r}")
    return model


def is_oom(e: BaseException) -> bool:
    import torch
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def run_train(args) -> None:
    import torch
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    module = import_train(args.workspace)
    ctx = Context(args.rx, args.tx, args.budget, args.device, args.seed, args.warm_start)
    model = module.train(ctx)
    cuda = args.device.startswith("cuda")
    info = {"device_name": torch.cuda.get_device_name() if cuda else "cpu",
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "warm_started": ctx.warm_started}
    send(args.tx, b"D", json.dumps(info).encode())
    model = check_model(model)
    torch.save(model.cpu(), os.path.join(args.out, "model.pt"))


def run_forward(args) -> None:
    import torch
    import_train(args.workspace)
    model = check_model(torch.load(args.model, map_location="cpu", weights_only=False)).to(args.device)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    send(args.tx, b"H", json.dumps({"context_len": model.context_len, "params": params}).encode())
    cuda = args.device.startswith("cuda")
    while True:
        kind, payload = recv(args.rx)
        b, t = struct.unpack("<II", payload[:8])
        if kind != b"X" or b == 0:
            return
        idx = torch.frombuffer(bytearray(payload[8:]), dtype=torch.uint8).view(b, t).long().to(args.device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(idx)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
            raise Invalid(f"the model must return logits of shape (B, T, {VOCAB}), got {type(logits).__name__}"
                          f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else ''}")
        logits = logits.detach().float().cpu().contiguous()
        raw = ctypes.string_at(logits.data_ptr(), logits.numel() * 4)  # bytes(storage) copies item by item
        send(args.tx, b"L", struct.pack("<III", *logits.shape) + raw)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "forward"])
    p.add_argument("--workspace", required=True)
    p.add_argument("--rx", type=int, required=True)
    p.add_argument("--tx", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="steps:1")
    p.add_argument("--out", help="train: the directory to save model.pt in")
    p.add_argument("--model", help="forward: the saved model")
    p.add_argument("--warm-start", help="train: a checkpoint ctx.load_checkpoint() may load")
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # the log keeps what was printed before a kill
    try:
        (run_train if args.mode == "train" else run_forward)(args)
    except Invalid as e:
        print(f"invalid: {e}", file=sys.stderr, flush=True)
        os._exit(EXIT_INVALID)
    except BaseException as e:  # noqa: BLE001 - agent code may raise anything, SystemExit included
        traceback.print_exc()
        sys.stderr.flush()
        if is_oom(e):
            os._exit(EXIT_OOM)
        os._exit(EXIT_INVALID if args.mode == "forward" and not isinstance(e, EOFError) else EXIT_CRASHED)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_OK)


if __name__ == "__main__":
    main()
