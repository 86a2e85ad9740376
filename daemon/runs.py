"""Creating runs and the files a run needs beside its events: judge copy, secrets, workspace state.

A run is created from a lab directory once: its files go into the blob store (the manifest), its
workspace into the snapshot repository (the base commit), its resolved configuration into `run.created`.
From then on nothing is read from the lab directory except program.md, which the daemon watches; the
judge runs from a private copy of the frozen files rebuilt from blobs and checked against the manifest
before every experiment.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rloopd.errors import LabConfigError
from rloopd.home import Home, private_dir
from rloopd.lab import Lab, load_lab
from rloopd.log import NewEvent, canonical_json, new_id
from rloopd.memory.rundir import materialize_frozen
from rloopd.memory.state import RunState
from rloopd.runner import Experiment, Portable
from rloopd.sandbox import allocate_uid, resolve_kind, training_sandbox


def new_run_id() -> str:
    return new_id()[:12]


def lab_secrets(home: Home) -> bytes:
    """The data seed and the hidden split's secret of this home; created once, readable by its owner only."""
    path = home.path / "secrets" / "lab.json"
    if not path.exists():
        path.parent.mkdir(mode=0o700, exist_ok=True)
        data = json.dumps({"data_seed": secrets.randbelow(2**31), "test_secret": secrets.token_hex(16)})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
    return path.read_bytes()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_manifest(home: Home, lab: Lab) -> list[dict[str, Any]]:
    """Every lab file with its sha256, stored as a blob (written and fsynced before run.created names it)."""
    files = [(f.path, "private" if f.private else f.role) for f in lab.manifest()]
    files += [(lab.program, "program"), ("rloop.toml", "other")]
    if (lab.root / lab.agent.prompt).is_file() and lab.agent.prompt not in {f for f, _ in files}:
        files.append((lab.agent.prompt, "other"))  # the session prompt's template, recorded like any lab file
    entries = []
    for rel, role in files:
        data = (lab.root / rel).read_bytes()
        entries.append({"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "blob": home.blobs.put(data),
                        "role": role})
    return entries


def agent_files(home: Home, agent: str, lab_root: Path) -> list[dict[str, Any]]:
    """The agent's own script when it is a file of the lab (`cmd:./agent.sh ...`), stored as a blob and
    recorded on run.created (`agent_files`); sessions run the recorded bytes (see sessions.py)."""
    from rloopd.agents import check_agent
    from rloopd.agents.cmd import program_in_lab

    if check_agent(agent) != "cmd" or (rel := program_in_lab(agent, lab_root)) is None:
        return []
    data = (Path(lab_root) / rel).read_bytes()
    return [{"path": rel, "sha256": hashlib.sha256(data).hexdigest(), "blob": home.blobs.put(data)}]


def lab_from_config(config: dict[str, Any], root: Path) -> Lab:
    """The lab as recorded on run.created, rooted at `root` (the judge's copy)."""
    lab = Lab.model_validate(config)
    lab._root = root
    return lab


def with_budget(lab: Lab, budget: str) -> Lab:
    """The lab with another budget, checked like rloop.toml's (a bad one names --budget)."""
    try:
        return lab_from_config({**lab.model_dump(mode="json"), "budget": budget}, lab.root)
    except ValidationError as e:
        raise LabConfigError(f"--budget {budget}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def parse_window(text: str) -> float:
    """`4h15m`, `90m`, `30s`, `2h` or plain seconds -> seconds (> 0)."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text or "")
    seconds = None
    if m and any(m.groups()):
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s
    if not seconds or seconds <= 0:
        raise LabConfigError(f"--window {text!r}: use a duration such as 4h15m, 90m or 600s")
    return seconds


def check_lab_for(lab: Lab, agent: str | None) -> str:
    """The checks a lab must pass before a run of `agent` is made of it (the entry point exists, a session
    agent's prompt template is sound); the agent spec in force. Batches run them for every condition first."""
    from rloopd.agents import SESSION_KINDS, check_agent

    for word in lab.command:
        if "{lab}" in word and not Path(word.replace("{lab}", str(lab.root))).exists():
            raise LabConfigError(f"{lab.root / 'rloop.toml'}: command: {word.replace('{lab}', str(lab.root))} "
                                 "does not exist (the entry point)")
    agent = agent or lab.agent.spec or "random"
    if check_agent(agent) in SESSION_KINDS:
        from rloopd.agents.cmd import check_template

        template = lab.root / lab.agent.prompt
        if template.is_file():
            check_template(template.read_text(), str(template))
    return agent


def check_space_for(lab: Lab, agent: str, key: str = "--space", where: str | None = None) -> str:
    """A built-in policy sets [params] constants: the space in force must leave it at least one. The message
    starts with `where`, else with `key` and the space's name."""
    from rloopd.agents import SESSION_KINDS, check_agent

    if check_agent(agent) not in SESSION_KINDS and lab.params and not lab.params_in_space():
        where = where or f"{key} {lab.space or '(the lab default)'}"
        raise LabConfigError(f"{where}: leaves {agent} no [params] constant to set (none lies in its editable "
                             f"files and regions)")
    return agent


def create_run(home: Home, lab_dir: Path, *, agent: str | None, experiments: int | None, budget: str | None,
               seed: int, name: str | None, sandbox: str = "auto", window: str | None = None,
               request: str | None = None, program: Path | None = None, batch: str | None = None,
               condition: str | None = None, memory: str | None = None, space: str | None = None,
               keys: dict[str, str] | None = None, inherited: tuple[str, dict | None] | None = None) -> str:
    """Validate everything first, then append `run.created`; nothing is written on a bad argument.

    `program`: a program file the run follows instead of the lab's (a batch condition's); `batch` and
    `condition` are recorded on run.created. `memory`: the memory policy (daemon/inherit.py); `space`: a
    search space preset of the lab's `[spaces]`. `keys` names the options in messages (a batch's fields).
    `inherited`: `memory` already resolved (a batch resolves a `from:` once for all its repeats)."""
    from rloopd.inherit import resolve_memory

    keys = keys or {}
    lab = load_lab(lab_dir).with_space(space, keys.get("space", "--space"))
    agent = check_space_for(lab, check_lab_for(lab, agent), keys.get("space", "--space"))
    memory_policy, memory_from = inherited or resolve_memory(home, memory, lab, keys.get("memory", "--memory"))
    if budget is not None:
        lab = with_budget(lab, budget)
    if experiments is not None and experiments < 0:
        raise LabConfigError(f"--experiments {experiments}: must be 0 or more")
    if name and any(e.data.get("name") == name for e in home.log.runs()):
        raise LabConfigError(f"--name {name!r}: a run with that name exists already")
    window_seconds = parse_window(window) if window is not None else None
    if window_seconds is not None and lab.budget_seconds and window_seconds < lab.budget_seconds:
        raise LabConfigError(f"--window {window}: shorter than one experiment's budget ({lab.budget} s)")
    kind = resolve_kind(sandbox)
    uid = allocate_uid({e.data["uid"] for e in home.log.runs() if e.data.get("uid") is not None})
    run = new_run_id()
    manifest = build_manifest(home, lab)
    program_file = Path(program).absolute() if program is not None else lab.root / lab.program
    try:
        program_bytes = program_file.read_bytes()
    except OSError as e:
        raise LabConfigError(f"--program {program_file}: cannot read it ({e.strerror})") from None
    workspace_src = lab.root / "workspace"
    base = home.snapshots.commit(workspace_src, run=run, ref="base", message="base workspace")
    home.log.append(run, [NewEvent("run.created", {
        "name": name or f"{lab.name}-{run[:6]}", "lab": str(lab.root), "manifest": manifest,
        "config": lab.model_dump(mode="json"), "metric": lab.metric.name, "direction": lab.metric.direction,
        "agent": agent, "agent_files": agent_files(home, agent, lab.root),
        "budget": lab.budget, "experiments": experiments, "seed": seed, "base_commit": base,
        "program_blob": home.blobs.put(program_bytes), "sandbox": kind, "uid": uid,
        "memory_policy": memory_policy, **({"memory_from": memory_from} if memory_from else {}),
        "search_space": lab.search_space(), "window_seconds": window_seconds,
        **({"program_path": str(program_file)} if program_file != lab.root / lab.program else {}),
        **({"batch": batch, "condition": condition} if batch else {})},
        **({"id": request} if request else {}))], expected_n=0)
    if kind == "none":
        home.log.append_one(run, "run.warned", {"about": "sandbox", "message": (
            "no sandbox: training runs as the daemon's own user and can read the home, including the "
            "lab's secrets and the hidden split; install bubblewrap or run the daemon as root")})
    elif kind == "setpriv":
        home.log.append_one(run, "run.warned", {"about": "sandbox", "message": (
            "setpriv only: training and agent sessions run as the run's own uid but see the whole filesystem, "
            "so whatever other users may read they can read (the home is closed to them but for the run's "
            "own directories); install bubblewrap")})
    from rloopd.agents import SESSION_KINDS, check_agent

    if memory_policy != "notes" and check_agent(agent) not in SESSION_KINDS:
        home.log.append_one(run, "run.warned", {"about": "memory", "message": (
            f"memory {memory_policy}: {agent} reads no notes; the policy only changes which checkpoint a warm "
            "start is offered")})
    run_dir = home.run_dir(run)
    home.secure_run(run, {"sandbox": kind, "uid": uid})
    home.snapshots.restore(base, run_dir / "workspace")
    materialize_frozen(run_dir, manifest, home.blobs)
    if memory_from:  # the inherited memory is there to read before the run starts
        project_run(home, run)
    return run


def project_run(home: Home, run: str) -> None:
    """Bring a run directory that no loop drives (a new, paused or stopped run) up to the log: program.md and
    memory/, and the position replay compares it at. A live run's loop does this itself."""
    from rloopd.memory.experiments import ExperimentsTable
    from rloopd.memory.folded import fold_history
    from rloopd.memory.rundir import project_memory

    fold = fold_history(home.log, run)
    project_memory(home.run_dir(run), fold.mem, home.blobs, fold.results_tsv(fold.state.metric))
    ExperimentsTable(home.log).set_position(f"rundir:{run}", fold.state.position)


def manifest_digest(created: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(created["manifest"]).encode()).hexdigest()[:16]


def judge_dir(home: Home, created: dict[str, Any]) -> Path:
    """The judge's private copy of the lab (frozen files, private ones included), rebuilt from blobs.

    Runs of one lab share the copy, and a daemon starting a batch starts many at once: the copy is built
    under an exclusive lock (`labs/<digest>.lock`), in a directory of its own, and renamed into place."""
    root = home.path / "labs" / manifest_digest(created)
    if (root / ".complete").exists():
        return root
    private_dir(root.parent)  # the judge's copies hold the lab's private files
    with open(root.with_name(root.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").exists():  # another run may have built it while this one waited
            tmp = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=root.parent))
            for entry in created["manifest"]:
                dest = tmp / entry["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(home.blobs.get(entry["blob"]))
            (tmp / ".complete").write_text("")
            shutil.rmtree(root, ignore_errors=True)  # a half-made copy from a crash
            os.replace(tmp, root)
    return root


def check_manifest(home: Home, created: dict[str, Any]) -> None:
    """Before each experiment: the judge's copy must match the manifest; a changed copy is rebuilt."""
    root = judge_dir(home, created)
    for entry in created["manifest"]:
        if entry["role"] in ("frozen", "private"):
            path = root / entry["path"]
            if not path.exists() or _digest(path) != entry["sha256"]:
                shutil.rmtree(root)
                judge_dir(home, created)
                return


def run_lab(home: Home, state: RunState) -> Lab:
    """The lab as recorded at creation (its configuration), rooted at the judge's copy."""
    return lab_from_config(state.created["config"], judge_dir(home, state.created))


def restore_workspace(home: Home, state: RunState, workspace: Path) -> None:
    """Put the run's workspace at its best commit (the base commit before any acceptance)."""
    target = state.best_commit or state.base_commit
    if not workspace.exists() or not home.snapshots.tree_equal(target, workspace):
        home.snapshots.restore(target, workspace)


def experiment_seed(created: dict[str, Any], step: int, replica: int = 0) -> int:
    """The training seed of a step: one per step of a run, the same for each attempt and for a re-execution.
    Replicas 1..K of a step (`rerun:K`, `rloopd noise`) get other seeds, drawn from (seed, step, replica)."""
    if replica == 0:
        return created["seed"] * 1000 + step
    digest = hashlib.sha256(f"replica:{created['seed']}:{step}:{replica}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 2**31


def experiment_for(home: Home, run: str, created: dict[str, Any], lab: Lab, snapshot: Path, step: int, *,
                   budget: str | None = None, env: dict[str, str] | None = None, replica: int = 0,
                   warm_start: str | None = None) -> Experiment:
    """What the runner needs to run `step` of `run` on the workspace files in `snapshot`, in the run's sandbox,
    under the judge's copy of the recorded frozen files (the loop and `replay --reexecute` share this).
    `warm_start`: the blob of the checkpoint offered to train(ctx) (`--warm-start`, read by the judge)."""
    scratch = home.path / "tmp" / run / "scratch"
    judge = judge_dir(home, created)
    sandbox = training_sandbox(created.get("uid"), hide=[home.path, Path(created["lab"])], scratch=scratch,
                               kind=created["sandbox"])
    return Experiment(command=lab.entry_command(judge, sys.executable), workspace=snapshot,
                      budget=budget or created["budget"], timeout=lab.timeout,
                      seed=experiment_seed(created, step, replica),
                      secrets=lab_secrets(home), sandbox=sandbox.prefix, cache=private_dir(home.path / "cache"),
                      scratch=scratch,
                      private=home.path / "tmp" / run / "judge", extra_args=lab.entry_args(), env=env or {},
                      warm_start=home.blobs.path(warm_start) if warm_start else None,
                      portable=Portable(lab=judge, command=list(lab.command), gpus=lab.gpus,
                                        sandbox=created["sandbox"], uid=created.get("uid"),
                                        label=f"{run}-s{step}-r{replica}"))


def prompt_template(home: Home, created: dict[str, Any]) -> tuple[str, str | None]:
    """(path, text) of the session prompt's template recorded at the run's creation; text None if the lab
    had none (the built-in one is used)."""
    path = lab_from_config(created["config"], Path(created["lab"])).agent.prompt
    entry = next((m for m in created.get("manifest", []) if m["path"] == path and m.get("blob")), None)
    return path, home.blobs.get_text(entry["blob"]) if entry else None
