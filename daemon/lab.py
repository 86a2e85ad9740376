"""A lab's rloop.toml: the validated model, its file manifest, and reading and rewriting train.py's constants.

`load_lab(path)` parses and checks rloop.toml against the lab directory and raises `LabConfigError`
with one line that names the file and the key. It never imports the lab's code: constants are found
with `ast`. A lab looks like this (the reference lab's own rloop.toml has every key):

    name = "byte-gpt"
    editable = ["workspace/*.py"]            # the search space
    frozen = ["frozen/**"]                   # what the agent may read but not change...
    private = ["frozen/private/**"]          # ...and, among those, what it never sees
    budget = 12                              # seconds of training, or "steps:N"
    timeout = 120                            # hard limit per child process, seconds
    [metric]
    name = "val_bpb"
    direction = "minimize"
    [params.LEARNING_RATE]                   # a constant the built-in policies may set
    range = [1e-4, 1e-2]
    log = true
    category = "learning rate"
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from rloopd import space as regions
from rloopd.errors import LabConfigError
from rloopd.redact import secret_reason
from rloopd.space import literal_assignments

CATEGORIES = ("learning rate", "depth", "width", "batch size", "schedule", "regularization", "optimizer",
              "context", "architecture", "other")
DEFAULT_COMMAND = ["{python}", "{lab}/frozen/experiment.py"]
SKIP_PARTS = {".git", "__pycache__", ".venv", "node_modules"}

Scalar = bool | int | float | str


class Param(BaseModel):
    """One constant a built-in policy may set: a range (`range = [low, high]`, `log`) or `choices`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    category: Literal[CATEGORIES]  # type: ignore[valid-type]
    low: float | None = None
    high: float | None = None
    choices: list[Scalar] | None = None
    log: bool = False
    file: str = "workspace/train.py"

    @model_validator(mode="before")
    @classmethod
    def _range(cls, data: Any) -> Any:
        if isinstance(data, dict) and "range" in data:
            data = dict(data)
            bounds = data.pop("range")
            if not (isinstance(bounds, list) and len(bounds) == 2):
                raise ValueError("range must be [low, high]")
            if any(isinstance(b, float) and not math.isfinite(b) for b in bounds):
                raise ValueError(f"range {bounds} must be two finite numbers")
            data["low"], data["high"] = bounds
        return data

    @model_validator(mode="after")
    def _one_space(self) -> Param:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either range = [low, high] or choices = [...]")
        if self.choices is not None and len(self.choices) < 2:
            raise ValueError("choices needs at least two values")
        if self.low is not None and self.high is not None:
            if not self.low < self.high:
                raise ValueError(f"range [{self.low}, {self.high}] is empty: low must be below high")
            if self.log and self.low <= 0:
                raise ValueError("a log-scale range must be positive")
        return self

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and not isinstance(value, bool) and self.low <= value <= self.high


class AgentConfig(BaseModel):
    """`[agent]`: how command-line agents run their sessions (daemon/agents/cmd.py, daemon/sessions.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    spec: str | None = None  # the agent a plain `rloopd run` uses, e.g. "cmd:'./agent.sh {prompt_file}'"
    prompt: str = "prompt.md"  # the session prompt's template, in the lab (a built-in one if absent)
    env: dict[str, str] = {}  # added to each session's environment; never a secret (see _check_agent_env)
    session_timeout: float = Field(default=3600.0, gt=0)  # seconds one session may last
    quiet_timeout: float | None = Field(default=None, gt=0)  # seconds without output before it is ended
    grace: float = Field(default=10.0, ge=0)  # SIGTERM, then SIGKILL this many seconds later
    empty_cap: int = Field(default=3, ge=1)  # sessions in a row without an experiment before the run ends
    backoff: float = Field(default=2.0, ge=0)  # seconds before the next session after an empty one, doubling
    max_output_mb: float = Field(default=16.0, gt=0)  # output kept per session (head and tail)
    processes: int = Field(default=256, ge=8)  # session limits (RLIMITs, as the run's uid)
    memory_mb: int = Field(default=8192, ge=64)
    file_mb: int = Field(default=1024, ge=1)
    disk_mb: int = Field(default=4096, ge=1)  # the session's files in all (workspace, memory, HOME, tmp)
    workspace_mb: int = Field(default=64, ge=1)  # workspace/ at a submit: the daemon reads and commits it whole
    notes_mb: float = Field(default=4.0, gt=0)  # memory/notes.md kept per session: the rest is cut
    # codex and claude (daemon/agents/cli.py); a spec's own options override these
    effort: str | None = None  # reasoning effort
    max_tokens: int | None = Field(default=None, gt=0)  # the run's spend cap in tokens (input + output)
    max_usd: float | None = Field(default=None, gt=0)  # ... and in dollars, where the CLI reports a cost
    args: list[str] = []  # extra words for the CLI
    binary: str | None = None  # the CLI's path (default: codex / claude on the daemon's PATH)
    codex_config: dict[str, Any] = {}  # merged into Codex's configuration (e.g. a custom model provider)
    artifacts_mb: float = Field(default=64.0, gt=0)  # memory/artifacts/ in all: more is not kept
    provider_cap: int = Field(default=5, ge=1)  # sessions in a row ended by provider errors before the run ends


class Space(BaseModel):
    """`[spaces.NAME]`: a search space preset a run or a batch condition can name (`--space NAME`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    editable: list[str] = Field(min_length=1)  # globs, as the top-level key
    regions: bool | list[str] = False  # narrow files with markers to these regions (daemon/space.py); True: all
    constants: bool = False  # the regions hold `NAME = literal` lines only: values may change, code may not
    description: str = ""


class Metric(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = "val_bpb"
    direction: Literal["minimize", "maximize"] = "minimize"


def parse_budget(value: Any) -> str:
    """`12`, `12.5`, `"12s"` -> seconds ("12", "12.5"); `"steps:N"` -> "steps:N". Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected seconds (a positive number) or 'steps:N', got {value!r}")
    if isinstance(value, str):
        m = re.fullmatch(r"steps:(\d+)", value.strip())
        if m and int(m.group(1)) > 0:
            return f"steps:{int(m.group(1))}"
        try:
            value = float(value.strip().removesuffix("s"))
        except ValueError:
            raise ValueError(f"expected seconds (a positive number) or 'steps:N', got {value!r}") from None
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    raise ValueError(f"expected seconds (a positive number) or 'steps:N', got {value!r}")


class Lab(BaseModel):
    """The validated rloop.toml of a lab at `root`."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    program: str = "program.md"
    editable: list[str] = Field(min_length=1)
    frozen: list[str] = Field(min_length=1)
    private: list[str] = []
    command: list[str] = Field(default_factory=lambda: list(DEFAULT_COMMAND), min_length=1)
    budget: str
    timeout: float = Field(gt=0)
    metric: Metric = Metric()
    accept: str = "better"
    gpus: int = Field(default=1, ge=0)
    source: str = "synthetic"
    memory_limit_mb: int | None = Field(default=None, gt=0)
    regions: bool | list[str] = False  # marked regions of the editable files the agent may change (space.py)
    constants: bool = False  # ... and only the values of their `NAME = literal` lines
    space: str | None = None  # the search space preset in force: a key of [spaces] (None: the top level)
    spaces: dict[str, Space] = {}
    warm_start: bool = False  # the entry point takes --warm-start CHECKPOINT (the run's best, offered to train)
    params: dict[str, Param] = {}
    categories: dict[str, str] = {}  # constant name or description word -> idea category (daemon/categories.py)
    agent: AgentConfig = AgentConfig()
    _root: Path = PrivateAttr(default=Path("."))

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> str:
        return parse_budget(v)

    @field_validator("accept")
    @classmethod
    def _accept(cls, v: str) -> str:
        if v == "better":
            return v
        m = re.fullmatch(r"margin:([0-9.eE+-]+)", v)
        try:
            if m and float(m.group(1)) >= 0:
                return v
        except ValueError:
            pass
        m = re.fullmatch(r"rerun:([0-9]+)", v)  # K re-runs of a candidate that wins (decide.py), K in 1..100
        if m and 1 <= int(m.group(1)) <= 100:
            return v
        raise ValueError(f"expected 'better', 'margin:X' with X >= 0 or 'rerun:K' with 1 <= K <= 100, got {v!r}")

    @model_validator(mode="after")
    def _timeout_over_budget(self) -> Lab:
        if self.budget_seconds is not None and self.timeout <= self.budget_seconds:
            raise ValueError(f"timeout: {self.timeout:g} s must exceed the budget of {self.budget_seconds:g} s")
        return self

    @property
    def root(self) -> Path:
        return self._root

    @property
    def budget_steps(self) -> int | None:
        return int(self.budget.split(":")[1]) if self.budget.startswith("steps:") else None

    @property
    def budget_seconds(self) -> float | None:
        return None if self.budget.startswith("steps:") else float(self.budget)

    def entry_command(self, lab_dir: Path, python: str) -> list[str]:
        """The experiment command with {python} (the daemon's interpreter) and {lab} (where it runs from)."""
        return [w.replace("{python}", python).replace("{lab}", str(lab_dir)) for w in self.command]

    def entry_args(self) -> list[str]:
        """Arguments of the lab's own that the runner appends (the runner adds workspace, budget, seed...)."""
        args = ["--source", self.source]
        if self.memory_limit_mb:
            args += ["--memory-limit", str(self.memory_limit_mb)]
        return args

    def manifest(self) -> list[LabFile]:
        return manifest(self)

    def with_space(self, name: str | None, file: str = "--space") -> Lab:
        """This lab with the search space `name` in force (its editable globs and regions); None: the lab's
        own default (`space`, else the top-level keys). Raises LabConfigError for a preset it does not define."""
        if name is not None and not name.strip():
            raise LabConfigError(f"{file} {name!r}: name a search space preset of [spaces]")
        name = name or self.space
        if name is None:
            return self
        if name not in self.spaces:
            known = ", ".join(sorted(self.spaces)) or "none"
            raise LabConfigError(f"{file} {name}: {self.root / 'rloop.toml'} defines no search space {name!r} "
                                 f"([spaces] presets: {known})")
        preset = self.spaces[name]
        lab = self.model_copy(update={"editable": list(preset.editable), "regions": preset.regions,
                                      "constants": preset.constants, "space": name})
        lab._root = self._root
        return lab

    def search_space(self) -> dict[str, Any]:
        """What run.created records and status and reports show."""
        preset = self.spaces.get(self.space) if self.space else None
        return {"preset": self.space, "editable": list(self.editable), "regions": self.regions,
                **({"constants": True} if self.constants else {}),
                **({"description": preset.description} if preset and preset.description else {})}

    def params_in_space(self) -> dict[str, Param]:
        """The [params] constants the built-in policies may set in the space in force: in an editable file,
        and inside a region in force where that file is narrowed to regions."""
        found: dict[str, Param] = {}
        sources: dict[str, bytes] = {}
        for name, param in self.params.items():
            if not matches(self.editable, param.file):
                continue
            if self.regions is not False:
                if param.file not in sources:
                    try:
                        sources[param.file] = (self.root / param.file).read_bytes()
                    except OSError:
                        sources[param.file] = b""
                data = sources[param.file]
                if regions.has_markers(data) and name not in regions.constants_in_force(data, self.regions, [name]):
                    continue
            found[name] = param
        return found


def space_label(search_space: dict[str, Any] | None) -> str:
    """A recorded search space in a few words: its preset's name, else its globs (and regions)."""
    d = search_space or {}
    if d.get("preset"):
        return str(d["preset"])
    text = ",".join(d.get("editable") or []) or "lab default"
    regions = d.get("regions")
    if regions is True:
        text += " (marked regions)"
    elif regions:
        text += f" (regions {','.join(regions)})"
    return text


def space_for_agent(search_space: dict[str, Any] | None) -> str:
    """What a session is told it may change (the prompt's `{space}`)."""
    d = search_space or {}
    globs = " ".join(d.get("editable") or ["workspace/**"])
    text = f"You may change the files matching {globs} (paths relative to the run directory)"
    regions = d.get("regions")
    if regions:
        which = "every marked region" if regions is True else \
            "the marked regions named " + ", ".join(regions)
        text += (f"; in a file with region markers, only the lines between `# rloop: begin editable NAME` and "
                 f"`# rloop: end editable` of {which}")
        if d.get("constants"):
            text += ", and there only the values of constant assignments (NAME = literal)"
    return text + (". Anything else you change is put back before the experiment runs and recorded as an "
                   "integrity violation.")


@dataclass(frozen=True)
class LabFile:
    path: str       # relative to the lab root, POSIX
    sha256: str
    size: int
    role: str       # "editable" or "frozen"
    private: bool   # frozen and never shown to the agent


def _glob_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def matches(patterns: list[str], rel: str) -> bool:
    """Whether a path relative to the lab root (e.g. `workspace/train.py`) matches one of the globs, whether
    or not it exists (an integrity check must judge a file the agent deleted too)."""
    return any(_glob_regex(p).match(rel) for p in patterns)


def glob_files(root: Path, pattern: str) -> list[str]:
    """Files under root matching a glob (`**` spans directories), skipping .git, __pycache__ and *.pyc."""
    parts = pattern.split("/")
    literal = []
    for p in parts[:-1]:
        if any(c in p for c in "*?["):
            break
        literal.append(p)
    start = root.joinpath(*literal)
    rx = _glob_regex(pattern)
    found = []
    if "\x00" in str(start):  # no path holds a NUL byte: nothing to walk
        return []
    if _is_file(start):
        return [pattern] if rx.match(pattern) else []
    for dirpath, dirnames, filenames in os.walk(start):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_PARTS)
        for f in filenames:
            rel = Path(dirpath, f).relative_to(root).as_posix()
            if not f.endswith(".pyc") and rx.match(rel):
                found.append(rel)
    return sorted(found)


def _is_file(path: Path) -> bool:
    """`path.is_file()`, and False for what cannot name a file at all (a NUL byte, a name too long)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def matching_files(root: Path, patterns: list[str]) -> set[str]:
    return {f for p in patterns for f in glob_files(root, p)}


def manifest(lab: Lab) -> list[LabFile]:
    """Every editable and frozen file with its sha256, the private ones flagged, sorted by path."""
    editable, frozen = matching_files(lab.root, lab.editable), matching_files(lab.root, lab.frozen)
    private = matching_files(lab.root, lab.private)
    rows = []
    for rel in sorted(editable | frozen):
        path = lab.root / rel
        rows.append(LabFile(rel, _sha256(path), path.stat().st_size,
                            "editable" if rel in editable else "frozen", rel in private))
    return rows


# --- module-level constants of train.py, read and rewritten without importing it ---

def _constant_nodes(source: str) -> dict[str, ast.expr]:
    """{name: value node} of the module-level literal constants (the last assignment of each name)."""
    return {name: node.value for name, node in literal_assignments(ast.parse(source))}


def read_constants(source: str) -> dict[str, Any]:
    """Module-level `NAME = literal` assignments. Example: read_constants("LR = 3e-4  # peak")["LR"] == 0.0003"""
    return {name: ast.literal_eval(node) for name, node in _constant_nodes(source).items()}


def format_value(value: Any) -> str:
    if isinstance(value, str):  # double quotes, as people write them, where that spells the same string
        quoted = json.dumps(value, ensure_ascii=False)
        return quoted if ast.literal_eval(quoted) == value else repr(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return repr(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    raise LabConfigError(f"cannot write {value!r} as a constant: use a bool, int, finite float or str")


def set_constants(source: str, values: dict[str, Any]) -> str:
    """Rewrite module-level constants in place, keeping everything else (comments, spacing) byte for byte.

    Example: set_constants("DEPTH = 2  # blocks\\n", {"DEPTH": 4}) == "DEPTH = 4  # blocks\\n"
    """
    try:
        nodes = _constant_nodes(source)
    except SyntaxError as e:
        raise LabConfigError(f"train.py does not parse: {e.msg} (line {e.lineno})") from None
    missing = sorted(set(values) - set(nodes))
    if missing:
        raise LabConfigError(f"no module-level constant named {', '.join(missing)}")
    lines = source.encode().splitlines(keepends=True)  # ast offsets count UTF-8 bytes
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    data = source.encode()
    edits = sorted(((starts[n.lineno - 1] + n.col_offset, starts[n.end_lineno - 1] + n.end_col_offset,
                     format_value(values[name]).encode()) for name, n in nodes.items() if name in values),
                   reverse=True)
    for begin, end, text in edits:
        rest = data[end:]
        gap = len(rest) - len(rest.lstrip(b" "))
        if rest[gap:gap + 1] == b"#":  # keep a trailing comment in its column where there is room
            pad = max(2 if gap >= 2 else 1, gap + (end - begin) - len(text))
            rest = b" " * pad + rest[gap:]
        data = data[:begin] + text + rest
    return data.decode()


# --- loading ---

def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after", "function-before")) or "(top)"


def _fail(file: Path, key: str, message: str) -> LabConfigError:
    return LabConfigError(f"{file}: {key}: {message}")


def load_lab(path: Path | str) -> Lab:
    """Read and check a lab's rloop.toml (path to the file or to the lab directory)."""
    path = file = Path(path)
    try:
        if path.is_dir():
            file = path / "rloop.toml"
        root = file.parent.resolve()
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise LabConfigError(f"{file}: no such file") from None
    except UnicodeDecodeError as e:
        raise LabConfigError(f"{file}: cannot read: {e}") from None
    except OSError as e:
        raise LabConfigError(f"{file}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise LabConfigError(f"{file}: not valid TOML: {e}") from None
    except RecursionError:
        raise LabConfigError(f"{file}: not valid TOML: arrays or tables nested too deeply") from None
    except ValueError as e:  # a path with a NUL byte
        raise LabConfigError(f"{file}: cannot read: {e}") from None
    try:
        lab = Lab.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = _loc(err["loc"])
        if err["type"] == "missing":
            raise _fail(file, key, "missing required key") from None
        if err["type"] == "extra_forbidden":
            raise _fail(file, key, "unknown key") from None
        msg = err["msg"].removeprefix("Value error, ")
        if key == "(top)" and msg.startswith("timeout: "):
            key, msg = "timeout", msg.removeprefix("timeout: ")
        raise _fail(file, key, msg) from None
    lab._root = root
    _check_files(lab, file)
    _check_spaces(lab, file)
    _check_agent_env(lab, file)
    return lab


def _check_spaces(lab: Lab, file: Path) -> None:
    """Each preset's globs match files that are not frozen; every editable file's region markers are sound
    (balanced, not nested); every region a space names is marked in one of its files."""
    if lab.space is not None and lab.space not in lab.spaces:
        known = ", ".join(sorted(lab.spaces)) or "none"
        raise _fail(file, "space", f"no [spaces.{lab.space}] table (presets: {known})")
    frozen = matching_files(lab.root, lab.frozen)
    spaces = [("", lab.editable, lab.regions, lab.constants)] + \
        [(f"spaces.{k}.", v.editable, v.regions, v.constants) for k, v in lab.spaces.items()]
    parsed: dict[str, list] = {}
    for prefix, editable, names, constants in spaces:
        files = set()
        for pattern in editable:
            found = glob_files(lab.root, pattern)
            if not found:
                raise _fail(file, f"{prefix}editable", f"{pattern!r} matches no file")
            files.update(found)
        both = sorted(files & frozen)
        if both:
            raise _fail(file, f"{prefix}editable", f"{both[0]} is also frozen")
        for rel in sorted(files):
            if rel not in parsed:
                try:
                    parsed[rel] = regions.parse((lab.root / rel).read_bytes())
                except regions.RegionError as e:
                    raise _fail(file, f"{prefix}editable", f"{rel}: {e}") from None
        if isinstance(names, list):
            marked = {n for rel in files for r in parsed[rel] for n in r.names}
            missing = [n for n in names if n not in marked]
            if missing:
                raise _fail(file, f"{prefix}regions", f"no editable file marks a region {missing[0]!r} "
                                                      f"(# rloop: begin editable {missing[0]})")
        if constants:
            if names is False:
                raise _fail(file, f"{prefix}constants", "needs regions: it limits the marked regions to constants")
            for rel in sorted(files):
                problem = regions.not_constants((lab.root / rel).read_bytes(), names) if parsed[rel] else ""
                if problem:
                    raise _fail(file, f"{prefix}constants", f"{rel}: {problem}")


def _check_agent_env(lab: Lab, file: Path) -> None:
    """rloop.toml is recorded in the log (the run's config and the file's blob) as it is, unredacted: an
    `[agent] env` entry that the redactor would treat as a secret, by its name or by its value's format, is
    refused here, at load time only, so that runs already recorded still load. The message names the key,
    never the value."""
    for name, value in lab.agent.env.items():
        if secret_reason(name, value):
            raise _fail(file, f"agent.env.{name}", "looks like a secret; secrets belong in the daemon's environment "
                        "(they are passed to sessions and redacted), not in the lab, which is recorded in the log")


def _check_files(lab: Lab, file: Path) -> None:
    root = lab.root
    if not _is_file(root / lab.program):
        raise _fail(file, "program", f"{lab.program} does not exist")
    for key in ("editable", "frozen", "private"):
        for pattern in getattr(lab, key):
            if not glob_files(root, pattern):
                raise _fail(file, key, f"{pattern!r} matches no file")
    editable, frozen = matching_files(root, lab.editable), matching_files(root, lab.frozen)
    both = sorted(editable & frozen)
    if both:
        raise _fail(file, "frozen", f"{both[0]} is also editable")
    loose = sorted(matching_files(root, lab.private) - frozen)
    if loose:
        raise _fail(file, "private", f"{loose[0]} is not a frozen file")
    sources: dict[str, dict[str, Any]] = {}
    for name, param in lab.params.items():
        key = f"params.{name}"
        if param.file not in editable:
            raise _fail(file, f"{key}.file", f"{param.file} is not an editable file")
        if param.file not in sources:
            try:
                sources[param.file] = read_constants((root / param.file).read_text())
            except SyntaxError as e:
                raise _fail(file, key, f"{param.file} does not parse: {e.msg} (line {e.lineno})") from None
            except (ValueError, RecursionError) as e:  # not UTF-8, a NUL byte, nested too deeply to parse
                raise _fail(file, key, f"{param.file} does not parse: {e}") from None
        constants = sources[param.file]
        if name not in constants:
            raise _fail(file, key, f"{param.file} has no module-level constant {name}")
        if not param.contains(constants[name]):
            raise _fail(file, key, f"the current value {constants[name]!r} in {param.file} is outside the "
                                   f"declared {'choices' if param.choices else 'range'}")
