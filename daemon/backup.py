"""A consistent online copy of a home: events.db through SQLite's backup API, then what it names.

Blobs and snapshot commits are written before the events that name them, so copying them after the
database snapshot gives a copy in which every event's blob and commit is present. The copy audits clean
on its own.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

from rloopd.errors import HomeError
from rloopd.home import Home


def backup(home: Home, dest: Path) -> dict[str, Any]:
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise HomeError(f"{dest}: exists and is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    target = sqlite3.connect(dest / "events.db")
    try:
        home.log.conn.backup(target)
        events = target.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    finally:
        target.close()
    copied = 0
    for src in sorted((home.path / "blobs").rglob("*")):
        if src.is_file() and not src.name.startswith(".tmp-"):
            out = dest / src.relative_to(home.path)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out)
            copied += 1
    git = home.path / "git"
    if git.exists():
        subprocess.run(["git", "clone", "--quiet", "--mirror", str(git), str(dest / "git")], check=True,
                       capture_output=True)
    for extra in ("secrets", "runs"):
        if (home.path / extra).exists():
            shutil.copytree(home.path / extra, dest / extra, symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.tmp", ".*.tmp*"))
    return {"dest": str(dest), "events": events, "blobs": copied}
