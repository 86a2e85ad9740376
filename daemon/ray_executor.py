"""Run each experiment as a Ray task on a cluster, the head daemon staying the single writer of the event log.

The interface is `RayExecutor.run(exp, stop) -> Outcome`, the signature of the local `runner.run_experiment`;
the daemon hands it to each loop as `LoopOptions.execute`. Everything else about an experiment (its events,
the decision, the checkpoint, the projections) happens on the head exactly as for a local run. The daemon
imports this module only with `executor = "ray"`, and it imports Ray inside its functions, so the local
executor never loads Ray.

What travels, as bytes through Ray (its object store; small values inline in the task). To the node: a tar
archive of the workspace snapshot (the commit's files, as `snapshots.export` writes them), a tar archive of
the judge's copy of the lab (the frozen files, private ones included; put once per lab), the warm-start
checkpoint when one is offered, and what the runner would pass the judge (budget, seed, timeout, the data
secrets, the lab's command with {python} and {lab} still to fill in). Back to the head: status, metrics,
reason, the log and the saved model, which the head writes into the judge's private directory so that the
loop stores it as it stores a local one. On the node, `_on_node` unpacks into private temporary
directories, rebuilds the run's sandbox for that node's paths, and runs the same `runner.run_experiment`,
the judge under `setpriv --pdeathsig KILL`, so that a worker killed mid-experiment takes its judge along.

Slots, the decision: the daemon keeps its SlotPool, sized at start from the cluster (one slot per GPU, or
per CPU on a cluster without GPUs), and a run holds a slot while its task is in flight. The pool is thus a
cap on in-flight tasks, granted in arrival order, and a run's window clock stops while it waits for one, as
on one box; Ray chooses the node and the GPU (`num_gpus` = the lab's GPUs, or `num_cpus=1` for a CPU lab or
a cluster without GPUs) and sets CUDA_VISIBLE_DEVICES; the slots' names are not used. Nodes that join or
leave are seen at the next daemon start: until then, tasks beyond what the cluster holds wait inside Ray
(their window clock runs), and capacity beyond the pool stays idle.

Failures: a worker or node that dies, an object lost with it, the connection to the cluster failing (while
the task runs or while it is submitted: the node list, the object puts, the submission itself), or no live
node with the lab's GPUs just now (one rebooting): `interrupted` with `Outcome.lost` set, which the loop
records and runs again as the next attempt; each loss in a row waits longer before the next task is
submitted (1 s, doubling to 60 s), so a cluster that is down is not hammered. Ray's memory monitor killing
the task: `oom`. Anything raised on the node (rloopd or a dependency missing there, a sandbox it cannot
build): `crashed`, with the reason. A lab asking for more GPUs than the largest node this executor has seen
(at connect, or since): `crashed` at once, instead of a task that would wait forever. The head's own disk
or database full while the outcome is written (the model, say): the storage error is raised, not an
outcome, so that the daemon stalls the run until there is space (service.storage_full), as for a local
run. A stop (pause, stop, window, shutdown) cancels the task: KeyboardInterrupt in it, on which the runner
kills the judge's process group; after CANCEL_GRACE the worker is killed.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import Any

from rloopd.errors import ExecutorError
from rloopd.runner import Experiment, Interrupted, Outcome

CONNECT_SECONDS = 60.0  # ray.init waits for a GCS far longer than a daemon's start may take
PROBE_SECONDS = 5.0  # a TCP connection to the GCS first: an unreachable address fails in seconds
CANCEL_GRACE = 5.0  # after a stop: time for the task to end its judge before its worker is killed
MAX_BACKOFF = 60.0  # the longest wait before a submission after losses in a row
# Ray's errors that mean the task was lost with its worker, node or connection, not that it failed (some are
# newer than Ray 2.9, hence by name)
LOST = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "LocalRayletDiedError", "RaySystemError",
        "RpcError", "TaskCancelledError", "OutOfDiskError")


def connect(address: str | None, where: str = "") -> RayExecutor:
    """The executor for the cluster at `address` (None: Ray's `auto`, the cluster this machine joined).
    Raises ExecutorError, one line naming `ray_address` and `where` it was set, when Ray is not installed
    or no cluster answers. In a process already connected (a test's driver) it uses that connection.

    Example: connect("10.0.0.1:6379", " (--ray-address)").slots() -> ("gpu", ["ray-gpu0", "ray-gpu1"])
    """
    name = f"ray_address {address or 'auto'}{where or (' (the default)' if address is None else '')}"
    try:
        import ray
    except ImportError:
        raise ExecutorError(f'{name}: executor "ray" needs Ray on this machine: pip install "rloopd[ray]"') from None
    if not ray.is_initialized():
        endpoint = _endpoint(address, name)
        if endpoint is not None:
            _probe(name, *endpoint)
        _init(ray, address or "auto", name)
    return RayExecutor(ray)


def _endpoint(address: str | None, name: str) -> tuple[str, int] | None:
    """(host, port) to probe, or None where Ray finds the cluster itself (`auto`, `local`)."""
    if address in (None, "auto", "local"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ExecutorError(f"{name}: use HOST:PORT (the head's GCS, port 6379 unless `ray start` was told "
                            "otherwise), ray://HOST:PORT (Ray Client) or auto")
    return host.strip("[]"), int(port)


def _probe(name: str, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ExecutorError(f"{name}: no Ray cluster answers there ({why}); start one (`ray start --head`) "
                            "or correct the address") from None


def _init(ray: Any, address: str, name: str) -> None:
    """ray.init in a thread, with a deadline (it would wait for an absent GCS for minutes). Off the main
    thread Ray installs no SIGTERM handler of its own, which leaves the daemon's in place."""
    box: dict[str, BaseException | None] = {}

    def target() -> None:
        try:
            # ERROR: Ray's own warnings would add lines to a one-line error (the daemon says what matters)
            ray.init(address=address, namespace="rloopd", log_to_driver=False, logging_level=logging.ERROR)
            box["error"] = None
        except BaseException as e:  # noqa: BLE001 - reported below, one line
            box["error"] = e

    thread = threading.Thread(target=target, name="ray-connect", daemon=True)
    thread.start()
    thread.join(CONNECT_SECONDS)
    if "error" not in box:
        raise ExecutorError(f"{name}: the cluster did not answer within {CONNECT_SECONDS:g} s")
    e = box["error"]
    if e is not None and isinstance(e, ConnectionError) and address == "auto":
        raise ExecutorError(f"{name}: no Ray cluster runs on this machine; join one (`ray start`) or name one "
                            "with --ray-address or ray_address") from None
    if e is not None:
        hint = ("; is it a Ray GCS, and does this daemon have the cluster's token (RAY_AUTH_TOKEN_PATH, README "
                '"Running on a Ray cluster")?') if isinstance(e, ConnectionError) else ""
        raise ExecutorError(f"{name}: {_last_line(e)}{hint}") from None


class RayExecutor:
    """Submits experiments to the connected cluster; safe to share between the daemon's run threads."""

    def __init__(self, ray: Any):
        self.ray = ray
        resources = ray.cluster_resources()
        self.gpus, self.cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        self.task = ray.remote(_on_node)
        self.lock = threading.Lock()
        self.labs: dict[Path, Any] = {}  # judge copy -> ObjectRef of its archive
        self.losses = 0  # tasks lost in a row (see run)
        self.largest = self.largest_node()  # GPUs of the largest node seen (at connect, or since)
        self.authenticated = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"

    def slots(self) -> tuple[str, list[str]]:
        """(kind, names) for the daemon's SlotPool: one slot per GPU of the cluster, else per CPU."""
        if self.gpus:
            return "gpu", [f"ray-gpu{i}" for i in range(self.gpus)]
        return "cpu", [f"ray-cpu{i}" for i in range(max(1, self.cpus))]

    def describe(self) -> str:
        return f"ray: {self.gpus} GPUs, {self.cpus} CPUs, token authentication {'on' if self.authenticated else 'off'}"

    def run(self, exp: Experiment, stop: threading.Event | None = None) -> Outcome:
        """Run `exp` on the cluster until it ends or `stop` is set (raises Interrupted, like the runner)."""
        stop = stop or threading.Event()
        spec = exp.portable
        if spec is None:
            raise ValueError("a Ray experiment needs `portable` (see runs.experiment_for)")
        with self.lock:
            losses = self.losses
        if losses and stop.wait(min(MAX_BACKOFF, 2.0 ** (losses - 1))):
            raise Interrupted("stopped")
        gpus = spec.gpus if self.gpus else 0
        submitted = False
        try:
            if gpus:
                now = self.largest_node()
                with self.lock:
                    self.largest = most = max(self.largest, now)
                if gpus > most:
                    return self.count(Outcome("crashed", {}, b"", 0.0, reason=f"the lab asks for {gpus} GPUs per "
                                              f"experiment and no node of the Ray cluster has had more than {most}"))
                if gpus > now:  # a node rebooting, say: lost for now, tried again after the backoff
                    outcome = Outcome("interrupted", {}, b"", 0.0, lost=True, reason=f"no live node of the Ray "
                                      f"cluster has {gpus} GPUs just now (the largest has {now}; {most} seen before)")
                    return self.count(outcome)
            warm = self.ray.put(exp.warm_start.read_bytes()) if exp.warm_start is not None else None
            payload = {"command": spec.command, "budget": exp.budget, "timeout": exp.timeout, "seed": exp.seed,
                       "secrets": exp.secrets, "extra_args": exp.extra_args, "sandbox": spec.sandbox,
                       "uid": spec.uid, "gpus": gpus, "label": spec.label,
                       "env": {k: v for k, v in exp.env.items() if k != "CUDA_VISIBLE_DEVICES"}}  # Ray sets it
            task = self.task.options(num_gpus=gpus, num_cpus=1, max_retries=0, retry_exceptions=False,
                                     name=f"rloopd-{spec.label}")
            ref = task.remote(payload, self.lab_archive(spec.lab), self.ray.put(pack(exp.workspace)), warm)
            submitted = True
            outcome = self.outcome(exp, self.wait(ref, stop))
        except Interrupted:
            raise
        except Exception as e:  # noqa: BLE001 - every failure of the cluster is classified, none kills the run
            if not isinstance(e, getattr(self.ray.exceptions, "RayError", ())) and _storage_full(e):
                raise  # the head's own disk or database (not a node's): the daemon stalls the run until there is space
            outcome = self.failed(e) if submitted else Outcome(
                "interrupted", {}, b"", 0.0, lost=True,
                reason=f"lost on the Ray cluster before the task started ({type(e).__name__}): {_first_line(e)}")
        return self.count(outcome)

    def count(self, outcome: Outcome) -> Outcome:
        """`outcome`, after counting the losses in a row (the backoff before the next submission)."""
        with self.lock:
            self.losses = self.losses + 1 if outcome.lost else 0
            if outcome.lost:  # the labs' objects may have gone with the connection: put again at the next task
                self.labs.clear()
        return outcome

    def lab_archive(self, lab: Path) -> Any:
        """The judge's copy of a lab, put once (its path names its manifest digest: runs.judge_dir)."""
        with self.lock:
            if lab not in self.labs:
                self.labs[lab] = self.ray.put(pack(lab, skip=(".complete",)))
            return self.labs[lab]

    def largest_node(self) -> int:
        return max((int(n["Resources"].get("GPU", 0)) for n in self.ray.nodes() if n.get("Alive")), default=0)

    def wait(self, ref: Any, stop: threading.Event) -> dict[str, Any]:
        try:
            while not self.ray.wait([ref], timeout=0.2)[0]:
                if stop.is_set():
                    self.cancel(ref)
                    raise Interrupted("stopped")
            return self.ray.get(ref)
        except KeyboardInterrupt:
            self.cancel(ref)
            raise Interrupted("interrupted by Ctrl-C") from None

    def cancel(self, ref: Any) -> None:
        """KeyboardInterrupt in the task (the runner then kills the judge's group); the worker if that hangs."""
        self.ray.cancel(ref)
        if not self.ray.wait([ref], timeout=CANCEL_GRACE)[0]:
            self.ray.cancel(ref, force=True)

    def outcome(self, exp: Experiment, result: dict[str, Any]) -> Outcome:
        """The node's result as the runner's Outcome; the model lands in the judge's private directory here."""
        exp.private.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="judge-", dir=exp.private))
        model = None
        if result.get("model") is not None:
            model = work / "model.pt"
            try:
                model.write_bytes(result["model"])
            except BaseException:  # a full disk, say: nothing half-written is left behind
                shutil.rmtree(work, ignore_errors=True)
                raise
        return Outcome(result["status"], result["metrics"], result["log"], result["wall"], model,
                       result.get("reason"), work, result.get("warm_started"))

    def failed(self, e: BaseException) -> Outcome:
        x = self.ray.exceptions
        if isinstance(e, x.OutOfMemoryError):
            return Outcome("oom", {}, b"", 0.0, reason=f"Ray's memory monitor killed the task: {_first_line(e)}")
        lost = (ConnectionError, *(getattr(x, name) for name in LOST if hasattr(x, name)))
        if isinstance(e, lost):
            return Outcome("interrupted", {}, b"", 0.0, lost=True,
                           reason=f"lost on the Ray cluster ({type(e).__name__}): {_first_line(e)}")
        # a RayTaskError's text ends with the line of what was raised on the node (a missing module, say)
        what = _last_line(e) if isinstance(e, x.RayTaskError) else f"{type(e).__name__}: {_last_line(e)}"
        return Outcome("crashed", {}, b"", 0.0, reason=f"on the Ray cluster: {what}")


# --- on the node ---------------------------------------------------------------------------------------

def _on_node(payload: dict[str, Any], lab_tar: bytes, workspace_tar: bytes, warm: bytes | None) -> dict[str, Any]:
    """The Ray task: unpack, run the judge with the runner, send back what the head records."""
    from rloopd.runner import run_experiment
    from rloopd.sandbox import training_sandbox

    host = socket.gethostname()
    _sweep()
    base = Path(tempfile.mkdtemp(prefix=f"rloopd-task-{os.getpid()}-"))  # 0700: lab, workspace, the judge's own
    top = Path(tempfile.mkdtemp(prefix=f"rloopd-scratch-{os.getpid()}-"))  # the children's passage, as on the head
    try:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES", "") if payload["gpus"] else ""
        header = f"rloopd: Ray task rloopd-{payload['label']} on {host}, CUDA_VISIBLE_DEVICES={devices}\n".encode()
        try:
            box = training_sandbox(payload["uid"], hide=[base, top], scratch=top / "scratch", kind=payload["sandbox"])
        except Exception as e:  # noqa: BLE001 - a sandbox this node cannot build: the experiment crashed
            return _result("crashed", header, reason=f"on {host}: {e}")
        if box.uid is not None:
            os.chown(top, -1, box.uid)
            os.chmod(top, 0o710)
        lab, workspace = base / "lab", base / "workspace"
        unpack(lab_tar, lab)
        unpack(workspace_tar, workspace)
        warm_path = None
        if warm is not None:
            warm_path = base / "warm-start"
            warm_path.write_bytes(warm)
        guard = [setpriv, "--pdeathsig", "KILL", "--"] if (setpriv := shutil.which("setpriv")) else []
        command = [w.replace("{python}", sys.executable).replace("{lab}", str(lab)) for w in payload["command"]]
        exp = Experiment(command=[*guard, *command], workspace=workspace, budget=payload["budget"],
                         timeout=payload["timeout"], seed=payload["seed"], secrets=payload["secrets"],
                         sandbox=box.prefix, cache=_cache(), scratch=top / "scratch", private=base / "judge",
                         extra_args=payload["extra_args"], env={**payload["env"], "CUDA_VISIBLE_DEVICES": devices},
                         warm_start=warm_path)
        out = run_experiment(exp)  # a cancel raises KeyboardInterrupt here: the runner kills the judge's group
        reason = out.reason
        if out.status == "crashed" and reason and reason.startswith("the judge exited"):
            reason = f"{reason} on {host}: {_error_line(out.log.decode(errors='replace'))}"
        return _result(out.status, header + out.log, out.metrics, out.wall_seconds,
                       out.model.read_bytes() if out.model is not None else None, reason, out.warm_started)
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


def _result(status: str, log: bytes, metrics: dict | None = None, wall: float = 0.0, model: bytes | None = None,
            reason: str | None = None, warm_started: bool | None = None) -> dict[str, Any]:
    return {"status": status, "log": log, "metrics": metrics or {}, "wall": wall, "model": model, "reason": reason,
            "warm_started": warm_started}


def _sweep() -> None:
    """Remove what tasks of dead workers left behind (a killed worker runs no `finally`): the directories of
    this module's naming whose worker pid is gone and which belong to this user."""
    for path in Path(tempfile.gettempdir()).glob("rloopd-*-*-*"):
        kind, _, rest = path.name.removeprefix("rloopd-").partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("task", "scratch") or not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        try:
            if path.lstat().st_uid == os.geteuid() and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _cache() -> Path:
    """The judge's cache on this node (generated data), kept between experiments; private to this user."""
    path = Path(tempfile.gettempdir()) / f"rloopd-cache-{os.geteuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or path.stat().st_uid != os.geteuid():
        path = Path(tempfile.mkdtemp(prefix="rloopd-cache-"))  # someone else's: do without a shared cache
    return path


# --- archives ------------------------------------------------------------------------------------------

def pack(directory: Path, skip: tuple[str, ...] = ()) -> bytes:
    """A tar archive of `directory` (its names relative to it), owned by nobody in particular."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if Path(info.name).name in skip:
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(directory), arcname=".", filter=clean)
    return buf.getvalue()


def unpack(data: bytes, dest: Path) -> None:
    """Extract an archive of `pack` under `dest`; the `data` filter refuses links and paths leaving it."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")


def _storage_full(e: BaseException) -> bool:
    """Whether `e` says the head's disk or database is full (imported here: service imports the loop)."""
    from rloopd.service import storage_full

    return storage_full(e) is not None


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:300]


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _error_line(log: str) -> str:
    """The last line of a log that names an exception (`ModuleNotFoundError: No module named 'torch'`), else
    its last line: why a judge died before writing its result, for the reason an experiment crashed."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)]
    return (errors or lines or ["(no output)"])[-1][:300]
