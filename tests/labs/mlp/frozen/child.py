"""The child of one mlp-lab experiment: runs train(ctx), saves the model, then labels the inputs the judge sends.

Agent code runs here, so nothing here is trusted: the judge copies this file into the experiment's scratch
root, starts it through the sandbox command, counts the batches it serves, and scores the labels it gets
back against labels it never sent. This file imports only torch and the standard library.

Wire format on the two descriptors the judge passes (--rx reads, --tx writes): one kind byte, a
little-endian uint32 payload length, then the payload.
  child B(uint32 batch size) -> judge b(float32 inputs (B, F), then uint8 labels (B,)) | s(stop) | e(error)
  child D(json: params) once train(ctx) has returned and model.pt is saved
  judge X(uint32 n, float32 inputs (n, F)) -> child P(uint8 labels (n,))
Exit codes: 0 ok, 1 crashed (an exception in training), 3 out of memory, 4 invalid (a bad model or output).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import struct
import sys
import time
import traceback

EXIT_OK, EXIT_CRASHED, EXIT_OOM, EXIT_INVALID = 0, 1, 3, 4


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
    """What train(ctx) receives: training batches until the budget is spent, the budget clock, the shapes.

    ctx.batches(batch_size) yields (x, y): float32 (batch_size, ctx.n_features) and int64 (batch_size,) on
    ctx.device, drawn at random from the training split. ctx.progress() is the spent fraction of the budget.
    """

    def __init__(self, rx: int, tx: int, budget: str, device: str, seed: int, features: int, classes: int):
        import torch
        self._torch, self._rx, self._tx = torch, rx, tx
        self.device, self.seed, self.budget = device, seed, budget
        self.n_features, self.n_classes = features, classes
        self.checkpoint = None  # this lab offers no checkpoint to start from (rloop.toml has no warm_start)
        kind, _, value = budget.partition(":")
        self.max_steps = int(value) if kind == "steps" else None
        self.max_seconds = None if kind == "steps" else float(budget)
        self.step = 0          # batches received so far
        self.started = None    # monotonic time of the first batch
        self.stopped = False   # the judge said the budget is spent

    def batch(self, batch_size: int):
        """One (x, y) batch, or None once the budget is spent."""
        if self.stopped:
            return None
        send(self._tx, b"B", struct.pack("<I", batch_size))
        kind, payload = recv(self._rx)
        if kind == b"s":
            self.stopped = True
            return None
        if kind != b"b":
            raise RuntimeError(f"the judge refused the batch: {payload.decode(errors='replace')}")
        if self.started is None:
            self.started = time.monotonic()
        self.step += 1
        torch, n = self._torch, batch_size * self.n_features * 4
        x = torch.frombuffer(bytearray(payload[:n]), dtype=torch.float32).view(batch_size, self.n_features)
        y = torch.frombuffer(bytearray(payload[n:]), dtype=torch.uint8).long()
        return x.to(self.device), y.to(self.device)

    def batches(self, batch_size: int):
        while (b := self.batch(batch_size)) is not None:
            yield b

    def load_checkpoint(self):
        """The reference lab's warm start; never offered here."""
        return None

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


def is_oom(e: BaseException) -> bool:
    import torch
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def predict(model, x, classes: int):
    """Labels for x, in chunks: argmax of the model's (n, classes) logits, which must be finite."""
    import torch
    labels = []
    with torch.no_grad():
        for chunk in x.split(1024):
            logits = model(chunk)
            if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (len(chunk), classes):
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise Invalid(f"the model must return logits of shape (B, {classes}), got {shape}")
            if not torch.isfinite(logits).all():
                raise Invalid("the model returned NaN or infinite logits")
            labels.append(logits.argmax(dim=1).to(torch.uint8).cpu())
    return torch.cat(labels)


def run(args) -> None:
    import torch
    torch.set_num_threads(1)  # small models: one thread is fastest and bit-for-bit repeatable
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    ctx = Context(args.rx, args.tx, args.budget, args.device, args.seed, args.features, args.classes)
    try:
        model = import_train(args.workspace).train(ctx)
    except BaseException as e:  # noqa: BLE001 - agent code may raise anything, SystemExit included
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_OOM if is_oom(e) else EXIT_CRASHED)
    model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    if not isinstance(model, torch.nn.Module):
        raise Invalid(f"train(ctx) must return an nn.Module, got {type(model).__name__}")
    torch.save(model, os.path.join(args.out, "model.pt"))
    params = sum(p.numel() for p in model.parameters())
    send(args.tx, b"D", json.dumps({"params": params}).encode())
    kind, payload = recv(args.rx)
    if kind != b"X":
        raise EOFError("the judge sent no inputs")
    (n,) = struct.unpack("<I", payload[:4])
    x = torch.frombuffer(bytearray(payload[4:]), dtype=torch.float32).view(n, args.features).to(args.device)
    model.eval()
    send(args.tx, b"P", predict(model, x, args.classes).numpy().tobytes())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workspace", required=True)
    p.add_argument("--rx", type=int, required=True)
    p.add_argument("--tx", type=int, required=True)
    p.add_argument("--out", required=True, help="the directory to save model.pt in")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="steps:1")
    p.add_argument("--features", type=int, required=True)
    p.add_argument("--classes", type=int, required=True)
    args = p.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # the log keeps what was printed before a kill
    try:
        run(args)
    except Invalid as e:
        print(f"invalid: {e}", file=sys.stderr, flush=True)
        os._exit(EXIT_INVALID)
    except BaseException as e:  # noqa: BLE001 - a model's forward may raise anything
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(EXIT_OOM if is_oom(e) else EXIT_CRASHED if isinstance(e, EOFError) else EXIT_INVALID)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_OK)


if __name__ == "__main__":
    main()
