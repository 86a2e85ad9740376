"""Run one experiment: the lab's entry point (the judge) in its own process group, under a hard timeout.

The runner hands the judge a snapshot of the workspace, the sandbox prefix for its children, the data
secrets on an inherited pipe (never an argument, a variable or a file a child can read), a private cache
and a scratch root, and reads back only the result file the judge writes. The children's output goes to a
log file that is stored as a blob and never parsed for the metric. Killing the process group ends the
judge and every child it started, whatever they do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "crashed", "oom", "timeout", "invalid", "interrupted")
GRACE_SECONDS = 60  # over the lab's own hard timeout, for data loading and evaluation


@dataclass
class Portable:
    """What an executor that runs the judge on another machine rebuilds the experiment from (runs.experiment_for
    fills it; the local runner does not read it): the paths of an `Experiment` mean nothing on another node."""

    lab: Path  # the judge's copy of the lab (frozen files, the private ones too), shipped whole
    command: list[str]  # the lab's command before {python} and {lab} are filled in
    gpus: int  # GPUs the lab asks for per experiment
    sandbox: str  # the run's sandbox kind, rebuilt there for that node's own paths
    uid: int | None  # the run's own uid (used where the node runs the task as root)
    label: str  # names the task on the cluster (`ps`, Ray's dashboard): run, step and replica


@dataclass
class Experiment:
    command: list[str]  # the entry point, e.g. [python, /judge/frozen/experiment.py]
    workspace: Path  # snapshot of the workspace to train (read by the judge, copied for its children)
    budget: str
    timeout: float
    seed: int
    secrets: bytes
    sandbox: list[str]
    cache: Path
    scratch: Path  # where the judge makes each experiment's scratch root (shown to the children)
    private: Path  # where the runner keeps the judge's result, logs and model (never shown to them)
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    warm_start: Path | None = None  # a checkpoint the judge offers to train(ctx) (`--warm-start`)
    portable: Portable | None = None  # for an executor elsewhere (daemon/ray_executor.py)


@dataclass
class Outcome:
    status: str
    metrics: dict[str, Any]
    log: bytes
    wall_seconds: float
    model: Path | None = None
    reason: str | None = None
    workdir: Path | None = None  # the judge's private directory; the caller removes it when done
    warm_started: bool | None = None  # train(ctx) loaded the offered checkpoint (None: none was offered)
    lost: bool = False  # the executor lost the experiment (a Ray node or worker died): the loop runs it again.
    # Set only by an executor (daemon/ray_executor.py), never from what the judge reports.


class Interrupted(Exception):
    """The experiment was ended from outside (Ctrl-C, stop, pause, shutdown)."""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_experiment(exp: Experiment, stop: threading.Event | None = None) -> Outcome:
    """Run the judge to completion, to its hard timeout, or until `stop` is set (raises Interrupted)."""
    exp.scratch.mkdir(parents=True, exist_ok=True)
    exp.private.mkdir(parents=True, exist_ok=True)
    # The judge's own files (result, logs, the saved model) live outside the scratch root that the
    # sandbox shows the children, so no child can read another child's output or plant a result.
    work = Path(tempfile.mkdtemp(prefix="judge-", dir=exp.private))
    result_path, log_path = work / "result.json", work / "train.log"
    read_fd, write_fd = os.pipe()
    os.write(write_fd, exp.secrets)  # small: fits in the pipe buffer
    os.close(write_fd)
    cmd = [*exp.command, "--workspace", str(exp.workspace), "--result", str(result_path),
           "--budget", exp.budget, "--timeout", str(exp.timeout), "--seed", str(exp.seed),
           "--secrets-fd", str(read_fd), "--sandbox", " ".join(_quote(w) for w in exp.sandbox),
           "--cache", str(exp.cache), "--scratch", str(exp.scratch), "--log", str(log_path),
           "--save-model", str(work / "model.pt"), *exp.extra_args,
           *(["--warm-start", str(exp.warm_start)] if exp.warm_start else [])]
    # neither the daemon's variables nor Ray's (a cluster's token among them) reach the judge and its children
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLOOPD_", "RAY_"))} | exp.env
    t0 = time.monotonic()
    with open(work / "judge.log", "wb") as judge_log:
        proc = subprocess.Popen(cmd, stdout=judge_log, stderr=subprocess.STDOUT, pass_fds=(read_fd,),
                                start_new_session=True, env=env, cwd=work)
    os.close(read_fd)
    deadline = t0 + exp.timeout * 2 + min(GRACE_SECONDS, 5 * exp.timeout)  # two children, then a backstop
    status = None
    try:
        while proc.poll() is None:
            if stop is not None and stop.wait(0.05):
                _kill_group(proc)
                shutil.rmtree(work, ignore_errors=True)
                raise Interrupted("stopped")
            if stop is None:
                time.sleep(0.05)
            if time.monotonic() > deadline:
                _kill_group(proc)
                status = "timeout"
    except KeyboardInterrupt:
        _kill_group(proc)
        shutil.rmtree(work, ignore_errors=True)
        raise Interrupted("interrupted by Ctrl-C") from None
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        else:
            try:  # children that outlived the judge
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    wall = time.monotonic() - t0
    log = _read(work / "judge.log") + _read(log_path)
    if status == "timeout":
        return Outcome("timeout", {}, log, wall, reason="the judge passed its hard deadline", workdir=work)
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        return Outcome("crashed", {}, log, wall, reason=f"the judge exited {proc.returncode} without a result",
                       workdir=work)
    status = result.get("status")
    if status not in STATUSES:
        return Outcome("crashed", {}, log, wall, reason=f"the judge reported an unknown status {status!r}",
                       workdir=work)
    if status == "interrupted":  # the daemon's word for an experiment it ended or lost; the judge's code may
        # be the agent's (the instant lab's train.py chooses its status), so it re-runs nothing
        return Outcome("crashed", {}, log, wall, reason="the judge reported `interrupted`, a status only the daemon "
                       "records", workdir=work)
    metrics = {k: v for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("schema", "seed")}
    model = work / "model.pt"
    warm = bool(result.get("warm_started")) if exp.warm_start else None
    return Outcome(status, metrics, log, wall, model if model.exists() else None, result.get("reason"), work, warm)


def _read(path: Path, cap: int = 8 << 20) -> bytes:
    """A log as the daemon keeps it: whole up to `cap`, else its first and last halves of `cap` (training
    code prints what it likes, and the daemon must not read or store gigabytes of it)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= cap:
                return f.read(cap)
            head = f.read(cap // 2)
            f.seek(size - cap // 2)
            return head + f"\n[rloopd: {size - cap} bytes of the log not kept]\n".encode() + f.read(cap // 2)
    except OSError:
        return b""


def _quote(word: str) -> str:
    import shlex

    return shlex.quote(word)
