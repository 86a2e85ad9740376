"""Where the reference lab lives: beside the package in a checkout, or in the wheel's shared data."""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from rloopd.errors import LabConfigError
from rloopd.lab import load_lab

LAB_PARTS = ("program.md", "rloop.toml", "workspace", "frozen")


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    found = [here.parent]  # a checkout (editable install): the repository root is the reference lab
    try:
        dist = metadata.distribution("rloopd")
        found += [Path(dist.locate_file(f)).resolve().parent for f in dist.files or []
                  if f.as_posix().endswith("share/rloopd/lab/rloop.toml")]
    except metadata.PackageNotFoundError:
        pass
    data = Path("share") / "rloopd" / "lab"
    found += [Path(sysconfig.get_path("data")) / data, Path(sys.prefix) / data, here.parent / data]  # wheel layouts
    return found


def reference_lab_dir() -> Path:
    """The reference lab: the repository root of a checkout, else `share/rloopd/lab` of the installed wheel."""
    for path in _candidates():
        if (path / "rloop.toml").is_file() and (path / "frozen").is_dir():
            return path
    raise LabConfigError("the reference lab is not installed with this copy of rloopd")


def copy_reference_lab(dest: Path, space: str | None = None) -> None:
    """Copy the reference lab to `dest`; `space` (a preset of its [spaces]) becomes the new lab's default."""
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise LabConfigError(f"{dest}: exists and is not empty")
    src = reference_lab_dir()
    if space is not None:
        load_lab(src).with_space(space)  # a preset the lab does not define: refused before anything is copied
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in LAB_PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, dest / part, ignore=ignore)
        else:
            shutil.copy2(src / part, dest / part)
    if space is not None:
        toml = dest / "rloop.toml"
        text, n = re.subn(r'(?m)^space = "[^"]*"', f'space = "{space}"', toml.read_text(), count=1)
        if n != 1:
            raise LabConfigError(f"{toml}: no top-level `space = ...` line to set")
        toml.write_text(text)
        load_lab(dest)
