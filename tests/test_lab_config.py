"""rloop.toml: the reference lab loads; bad files fail with one line naming file and key; constants round-trip."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rloopd.lab import LabConfigError, Param, load_lab, read_constants, set_constants

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = """\
name = "mini"
editable = ["workspace/*.py"]
frozen = ["frozen/**"]
private = ["frozen/private/**"]
budget = "steps:10"
timeout = 30
[params]
LR = { range = [1e-4, 1e-1], log = true, category = "learning rate" }
DEPTH = { range = [1, 8], category = "depth" }
OPT = { choices = ["adamw", "sgd"], category = "optimizer" }
"""
TRAIN = 'LR = 3e-3  # peak\nDEPTH = 2   # blocks\nOPT = "adamw"  # which\n\ndef train(ctx):\n    return None\n'


def make_lab(tmp_path: Path, toml: str = MINIMAL, train: str = TRAIN) -> Path:
    (tmp_path / "workspace").mkdir(exist_ok=True)
    (tmp_path / "frozen" / "private").mkdir(parents=True, exist_ok=True)
    (tmp_path / "workspace" / "train.py").write_text(train)
    (tmp_path / "frozen" / "experiment.py").write_text("# entry\n")
    (tmp_path / "frozen" / "private" / "source.py").write_text("# generator\n")
    (tmp_path / "program.md").write_text("# program\n")
    (tmp_path / "rloop.toml").write_text(toml)
    return tmp_path


def error_of(tmp_path: Path, toml: str, train: str = TRAIN) -> str:
    make_lab(tmp_path, toml, train)
    with pytest.raises(LabConfigError) as e:
        load_lab(tmp_path / "rloop.toml")
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "rloop.toml") + ": ")
    return message.split(": ", 1)[1]


def test_the_reference_lab_loads():
    lab = load_lab(ROOT)
    assert lab.name == "byte-gpt" and lab.metric.name == "val_bpb" and lab.metric.direction == "minimize"
    assert lab.budget == "12" and lab.budget_seconds == 12 and lab.budget_steps is None
    assert lab.accept == "better" and lab.gpus == 1 and lab.source == "synthetic"
    assert lab.entry_command(Path("/judge"), "/py") == ["/py", "/judge/frozen/experiment.py"]
    assert lab.entry_args() == ["--source", "synthetic"]
    constants = read_constants((ROOT / "workspace" / "train.py").read_text())
    assert set(lab.params) <= set(constants)
    for name in ("LEARNING_RATE", "DEPTH", "WIDTH", "N_HEAD", "CONTEXT", "BATCH_SIZE", "WARMUP", "WARMDOWN",
                 "WEIGHT_DECAY", "DROPOUT", "OPTIMIZER"):
        assert name in constants
    assert {p.category for p in lab.params.values()} >= {"learning rate", "depth", "width", "batch size",
                                                         "schedule", "regularization", "optimizer", "context"}


def test_manifest_lists_editable_and_frozen_files_with_private_flagged():
    rows = {r.path: r for r in load_lab(ROOT).manifest()}
    assert rows["workspace/train.py"].role == "editable" and not rows["workspace/train.py"].private
    assert rows["frozen/experiment.py"].role == "frozen" and not rows["frozen/experiment.py"].private
    assert rows["frozen/private/source.py"].private and rows["frozen/README.md"].role == "frozen"
    assert all(re.fullmatch(r"[0-9a-f]{64}", r.sha256) for r in rows.values())
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in rows)


def test_minimal_lab_and_its_defaults(tmp_path):
    lab = load_lab(make_lab(tmp_path))  # a directory works as well as the file
    assert lab.budget_steps == 10 and lab.program == "program.md"
    assert lab.command == ["{python}", "{lab}/frozen/experiment.py"]
    assert lab.params["LR"].low == 1e-4 and lab.params["LR"].log
    assert lab.params["OPT"].choices == ["adamw", "sgd"]


@pytest.mark.parametrize("edit, key, words", [
    (lambda t: t.replace('name = "mini"\n', ""), "name", "missing required key"),
    (lambda t: t.replace('budget = "steps:10"', 'budget = "fast"'), "budget", "steps:N"),
    (lambda t: t.replace('budget = "steps:10"', 'budget = "steps:0"'), "budget", "steps:N"),
    (lambda t: t.replace('budget = "steps:10"', "budget = -3"), "budget", "positive"),
    (lambda t: t.replace('budget = "steps:10"', "budget = 60"), "timeout", "must exceed"),
    (lambda t: t.replace("timeout = 30", "timeout = 30\naccept = \"worse\""), "accept", "margin:X"),
    (lambda t: t.replace("timeout = 30", "timeout = 30\nbudgte = 3"), "budgte", "unknown key"),
    (lambda t: t.replace("timeout = 30", "timeout = 30\ngpus = -1"), "gpus", "greater than or equal"),
    (lambda t: t + "[metric]\ndirection = \"down\"\n", "metric.direction", "minimize"),
    (lambda t: t.replace('category = "depth"', 'category = "vibes"'), "params.DEPTH.category", "learning rate"),
    (lambda t: t.replace("range = [1, 8]", "range = [8, 1]"), "params.DEPTH", "empty"),
    (lambda t: t.replace('range = [1e-4, 1e-1], log = true', 'range = [0, 1e-1], log = true'), "params.LR",
     "positive"),
    (lambda t: t + 'WIDTH = { range = [8, 64], category = "width" }\n', "params.WIDTH", "no module-level constant"),
    (lambda t: t.replace("range = [1, 8]", "range = [3, 8]"), "params.DEPTH", "outside"),
    (lambda t: t.replace('"frozen/private/**"', '"frozen/secret/**"'), "private", "matches no file"),
    (lambda t: t.replace('frozen = ["frozen/**"]', 'frozen = ["frozen/*.py"]'), "private", "not a frozen file"),
    (lambda t: "program = \"nope.md\"\n" + t, "program", "does not exist"),
    (lambda t: t.replace("[params]", "[params\n"), None, "not valid TOML"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, edit, key, words):
    message = error_of(tmp_path, edit(MINIMAL))
    if key is not None:
        assert message.startswith(f"{key}: "), message
    assert words in message, message


def test_param_naming_a_constant_in_a_file_that_does_not_parse(tmp_path):
    message = error_of(tmp_path, MINIMAL, train="LR = 3e-3\nDEPTH = 2\nOPT = 'x'\ndef broken(:\n")
    assert message.startswith("params.") and "does not parse" in message


@pytest.mark.parametrize("name, value", [
    ("OPENAI_API_KEY", "not-even-a-real-key"),       # a credential's name, whatever the value
    ("WANDB_API_KEY", "0123456789abcdef"),
    ("HF_TOKEN", "hf_abcdefghijklmnop"),
    ("DB_PASSWORD", "correct horse"),
    ("CLIENT_SECRET", "s3cr3t-value"),
    ("EXTRA_ARGS", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"),  # a key's format, whatever the name
    ("PROXY", "ghp_" + "a" * 36),
])
def test_a_secret_in_agent_env_is_refused_naming_the_key_not_the_value(tmp_path, name, value):
    message = error_of(tmp_path, MINIMAL + f'[agent.env]\nPYTHONUNBUFFERED = "1"\n{name} = "{value}"\n')
    assert message.startswith(f"agent.env.{name}: looks like a secret; secrets belong in the daemon's environment")
    assert "recorded in the log" in message and value not in message


def test_harmless_agent_env_is_accepted(tmp_path):
    env = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "4",
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "0"}  # a name like a credential with a short value too
    toml = MINIMAL + "[agent.env]\n" + "".join(f'{k} = "{v}"\n' for k, v in env.items())
    assert load_lab(make_lab(tmp_path, toml)).agent.env == env


def test_set_constants_rewrites_values_and_keeps_the_rest():
    out = set_constants(TRAIN, {"LR": 0.01, "DEPTH": 12, "OPT": "sgd"})
    assert out == 'LR = 0.01  # peak\nDEPTH = 12  # blocks\nOPT = "sgd"    # which\n\ndef train(ctx):\n    return None\n'
    assert read_constants(out) == {"LR": 0.01, "DEPTH": 12, "OPT": "sgd"}
    assert set_constants(TRAIN, {}) == TRAIN
    with pytest.raises(LabConfigError, match="WIDTH"):
        set_constants(TRAIN, {"WIDTH": 3})
    with pytest.raises(LabConfigError):
        set_constants(TRAIN, {"LR": float("nan")})


def test_set_constants_on_the_reference_train_py_only_touches_those_lines():
    source = (ROOT / "workspace" / "train.py").read_text()
    out = set_constants(source, {"LEARNING_RATE": 0.004, "OPTIMIZER": "sgd"})
    changed = [(a, b) for a, b in zip(source.splitlines(), out.splitlines(), strict=True) if a != b]
    assert len(changed) == 2 and len(out.splitlines()) == len(source.splitlines())
    assert read_constants(out)["LEARNING_RATE"] == 0.004 and read_constants(out)["OPTIMIZER"] == "sgd"


def test_param_contains():
    p = Param(range=[1, 4], category="depth")
    assert p.contains(1) and p.contains(4) and not p.contains(5) and not p.contains(True)
    assert Param(choices=["a", "b"], category="optimizer").contains("a")


def test_lab_module_does_not_import_torch(tmp_path):
    code = "import sys, rloopd.lab; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_frozen_tree_stays_clean_after_running_the_entry_point(tmp_path):
    """The judge writes no bytecode into frozen/: the manifest of a lab must not change by running it."""
    lab = tmp_path / "lab"
    shutil.copytree(ROOT / "frozen", lab / "frozen", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, str(lab / "frozen" / "experiment.py"), "--help"], check=True,
                   capture_output=True)
    assert not list((lab / "frozen").rglob("__pycache__"))
