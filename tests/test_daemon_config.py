"""rloopd.toml, the daemon's settings: a flag wins over the file, the file over the default; a bad file or
flag is one line naming the file (or the flag) and the key."""

from __future__ import annotations

import re
import sqlite3

import pytest

from rloopd.config import DaemonConfig, cap_pages, settings
from rloopd.errors import ConfigError

from .conftest import rloopd


def test_flag_over_file_over_default(tmp_path):
    assert settings(None, tmp_path) == DaemonConfig()  # no file in the home: the defaults
    (tmp_path / "rloopd.toml").write_text('gpus = "0,1"\ncpu_slots = 3\nsynchronous = "normal"\nmax_db_mb = 512\n')
    cfg = settings(None, tmp_path, cpu_slots=None, max_db_mb=64.0)
    assert (cfg.gpus, cfg.cpu_slots, cfg.synchronous, cfg.max_db_mb) == ("0,1", 3, "NORMAL", 64.0)
    assert cfg.source("max_db_mb") == "--max-db-mb" and cfg.source("gpus") == str(tmp_path / "rloopd.toml")
    other = tmp_path / "elsewhere.toml"
    other.write_text("cpu_slots = 2\n")
    cfg = settings(other, tmp_path)  # --config replaces the home's file, it does not add to it
    assert (cfg.gpus, cfg.cpu_slots, cfg.max_db_mb) == ("auto", 2, None)


@pytest.mark.parametrize("text, message", [
    ("cpu_slots = \n", "not valid TOML"),
    ('gpu = "auto"\n', "gpu: unknown key"),
    ('cpu_slots = "2"\n', "cpu_slots: Input should be a valid integer"),
    ("cpu_slots = 0\n", "cpu_slots: Input should be greater than or equal to 1"),
    ("max_db_mb = -1\n", "max_db_mb: Input should be greater than 0"),
    ('gpus = "0,0"\n', "gpus: use auto, none, or distinct GPU indices"),
    ('synchronous = "fast"\n', "synchronous: Input should be"),
])
def test_a_bad_file_names_the_file_and_the_key(tmp_path, text, message):
    file = tmp_path / "rloopd.toml"
    file.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(file))}: ") as e:
        settings(None, tmp_path)
    assert message in str(e.value)


def test_a_named_file_must_exist_and_a_bad_flag_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothing.toml: no such file"):
        settings(tmp_path / "nothing.toml", tmp_path)
    with pytest.raises(ConfigError, match="^--cpu-slots 0: "):
        settings(None, tmp_path, cpu_slots=0)


def test_serve_reports_a_bad_file_in_one_line(tmp_path):
    (tmp_path / "rloopd.toml").write_text("max_db_mb = \"big\"\n")
    proc = rloopd("serve", "--config", str(tmp_path / "rloopd.toml"), home=tmp_path / "home")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{tmp_path / 'rloopd.toml'}: max_db_mb: " in proc.stderr


def test_the_cap_is_in_pages(tmp_path):
    conn = sqlite3.connect(tmp_path / "x.db")
    cap_pages(conn, 1)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    assert conn.execute("PRAGMA max_page_count").fetchone()[0] == (1 << 20) // page_size
    conn.execute("CREATE TABLE t (x)")
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        conn.execute("INSERT INTO t VALUES (?)", (b"x" * (2 << 20),))
