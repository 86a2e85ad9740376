"""Where the reference lab lives: beside the package in a checkout, or in the wheel's shared data."""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

from rloopd.errors import LabConfigError

LAB_PARTS = ("program.md", "rloop.toml", "workspace", "frozen")


def reference_lab_dir() -> Path:
    """The reference lab: the repository root of an editable install, else `share/rloopd/lab` of the wheel."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "rloop.toml").is_file() and (checkout / "frozen").is_dir():
        return checkout
    try:
        dist = metadata.distribution("rloopd")
        for f in dist.files or []:
            if f.as_posix().endswith("share/rloopd/lab/rloop.toml"):
                return Path(dist.locate_file(f)).resolve().parent
    except metadata.PackageNotFoundError:
        pass
    raise LabConfigError("the reference lab is not installed with this copy of rloopd")


def copy_reference_lab(dest: Path) -> None:
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise LabConfigError(f"{dest}: exists and is not empty")
    src = reference_lab_dir()
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in LAB_PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, dest / part, ignore=ignore)
        else:
            shutil.copy2(src / part, dest / part)
