"""A pool of experiment slots (GPUs, or CPU slots where there is none), granted in arrival order."""

from __future__ import annotations

import subprocess
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from rloopd.errors import RloopdError


class SlotError(RloopdError):
    """A --gpus or --cpu-slots value that cannot be used."""


def detect_gpus() -> list[str]:
    """GPU indices nvidia-smi reports (none on a machine without an NVIDIA driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()] if out.returncode == 0 else []


def parse_slots(gpus: str, cpu_slots: int) -> tuple[str, list[str]]:
    """(`gpu` | `cpu`, slot names) from `--gpus auto|none|0,1,3` and `--cpu-slots N`."""
    if cpu_slots < 1:
        raise SlotError(f"--cpu-slots {cpu_slots}: must be 1 or more")
    if gpus == "auto":
        found = detect_gpus()
        return ("gpu", found) if found else ("cpu", [f"cpu{i}" for i in range(cpu_slots)])
    if gpus == "none":
        return "cpu", [f"cpu{i}" for i in range(cpu_slots)]
    ids = [g.strip() for g in gpus.split(",")]
    if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
        raise SlotError(f"--gpus {gpus!r}: use auto, none, or distinct GPU indices such as 0,1,3")
    return "gpu", ids


class SlotPool:
    """Grants `n` slots to one holder at a time in arrival order (a waiting run is never overtaken)."""

    def __init__(self, kind: str, names: list[str]):
        self.kind, self.names = kind, list(names)
        self.free = list(names)
        self.queue: deque[object] = deque()
        self.cond = threading.Condition()
        self.holders: dict[str, str] = {}  # slot -> run

    def size(self) -> int:
        return len(self.names)

    def _acquire(self, run: str, n: int, cancelled: threading.Event | None) -> list[str] | None:
        ticket = object()
        with self.cond:
            self.queue.append(ticket)
            try:
                while not (self.queue[0] is ticket and len(self.free) >= n):
                    if cancelled is not None and cancelled.is_set():
                        return None
                    self.cond.wait(0.2)
                got = [self.free.pop(0) for _ in range(n)]
                self.holders.update({g: run for g in got})
                return got
            finally:
                self.queue.remove(ticket)
                self.cond.notify_all()

    def _release(self, got: list[str]) -> None:
        with self.cond:
            for g in got:
                self.holders.pop(g, None)
            self.free.extend(got)
            self.free.sort(key=self.names.index)
            self.cond.notify_all()

    @contextmanager
    def hold(self, run: str, n: int, cancelled: threading.Event | None = None) -> Iterator[dict[str, str] | None]:
        """Wait for `n` slots (fewer if the pool is smaller) and yield the environment that names them;
        yield None when `cancelled` is set while waiting."""
        got = self._acquire(run, max(1, min(n, len(self.names))), cancelled)
        if got is None:
            yield None
            return
        try:
            yield {"CUDA_VISIBLE_DEVICES": ",".join(got) if self.kind == "gpu" else ""}
        finally:
            self._release(got)

    def slot_of(self, run: str) -> list[str]:
        return [s for s, r in self.holders.items() if r == run]
