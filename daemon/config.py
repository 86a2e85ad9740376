"""The daemon's settings (`rloopd serve`): a flag given on the command line, else rloopd.toml, else the default.

Where the file is: `--config PATH` names one, and then it must exist (a typo must not quietly give a
daemon the defaults: every GPU, no size cap); without `--config`, `<home>/rloopd.toml` is read if it is
there. The service names `/etc/rloopd/rloopd.toml` in its unit (ops/rloopd.service), because that is where
a sysadmin looks for and edits a service's settings; ops/README.md installs the file (ops/rloopd.toml:
every key, commented out, so an untouched copy means the defaults), and a missing one fails the start with
one line in the journal naming it, like any other bad setting. A file looks like this:

    gpus = "0,1"          # auto, none, or GPU indices
    cpu_slots = 2         # experiment slots when there is no GPU
    synchronous = "FULL"  # SQLite durability: FULL, NORMAL
    max_db_mb = 2048      # events.db stops growing here (MiB); runs then wait, see below
    executor = "ray"      # run experiments as tasks on a Ray cluster (default "local": here)
    ray_address = "10.0.0.1:6379"  # that cluster's GCS (default: Ray's "auto", the one this machine joined)
    http = "127.0.0.1:8765"  # the live dashboard (rloopd.dashboard); loopback only, unless
                             # http_allow_remote = true

Each key is also a flag (`--` and the key with dashes); a later key is one field on `DaemonConfig` (a
table, one field whose type is a model of its own, where its keys need no flags; the dashboard's `http` and
`http_allow_remote` stay flat so that each is a flag). Errors are one line naming the file (or
the flag) and the key, like rloop.toml's.

`max_db_mb` caps the event log through SQLite's `max_page_count`, set on every connection the daemon
writes through (`Home.open`). At the cap SQLite refuses the write ("database or disk is full", rolled
back), and the run waits for space as on a full disk (rloopd.service). Space in an append-only log never
comes back by itself, so `status` says to raise the cap and restart the daemon: the runs then go on from
where they stopped (the next start recovers them). The -wal file comes on top of the cap until a
checkpoint folds it in, and blobs are not counted.
"""

from __future__ import annotations

import ipaddress
import shutil
import sqlite3
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from rloopd.errors import ConfigError

FILE = "rloopd.toml"
MIB = 1 << 20


class DaemonConfig(BaseModel):
    """Every key of rloopd.toml. Strict: a number in quotes or a string where a number goes is an error."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    gpus: str = "auto"
    cpu_slots: int = Field(1, ge=1)
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    max_db_mb: float | None = Field(None, gt=0)
    executor: Literal["local", "ray"] = "local"  # where experiments run (daemon/ray_executor.py)
    ray_address: str | None = Field(None, min_length=1)  # the cluster with executor "ray"; None: Ray's "auto"
    http_allow_remote: bool = False  # let `http` be an address other than loopback (before `http`: it reads this)
    http: str | None = None  # the dashboard's HOST:PORT (rloopd.dashboard); no dashboard when unset
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)  # key -> the file or flag that set it

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: str) -> str:
        ids = [g.strip() for g in v.split(",")]
        if v not in ("auto", "none") and not (all(g.isdigit() for g in ids) and len(set(ids)) == len(ids)):
            raise ValueError("use auto, none, or distinct GPU indices such as 0,1,3")
        return v

    @field_validator("http")
    @classmethod
    def _http(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            host, _ = listen_address(v)
            if not is_loopback(host) and not info.data.get("http_allow_remote"):
                raise ValueError(f"{host} is not a loopback address, and the dashboard can pause, stop and fork "
                                 "runs: allow it with --http-allow-remote (http_allow_remote = true), behind TLS")
        return v

    @field_validator("synchronous", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    def source(self, key: str) -> str | None:
        """The file or the flag that set `key`; None for a default."""
        return self._sources.get(key)


def listen_address(text: str) -> tuple[str, int]:
    """(host, port) of `HOST:PORT` (`[::1]:8765` for IPv6; port 0 takes a free one); ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("use HOST:PORT, such as 127.0.0.1:8765 (port 0 takes a free one)")
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host), int(port)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a name other than localhost could resolve anywhere)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def load(config: Path | None, home: Path) -> tuple[DaemonConfig, Path | None]:
    """The settings of the file `--config` names (which must exist), else of `<home>/rloopd.toml` if there."""
    file = Path(config).expanduser() if config is not None else Path(home).expanduser() / FILE
    if config is None and not file.exists():
        return DaemonConfig(), None
    try:
        raw = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file (named by --config)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{file}: not valid TOML: {e}") from None
    try:
        cfg = DaemonConfig.model_validate(raw)
    except ValidationError as e:
        key, msg = _first(e)
        raise ConfigError(f"{file}: {key}: {msg}") from None
    cfg._sources.update({k: str(file.absolute()) for k in cfg.model_fields_set})
    return cfg, file


def settings(config: Path | None, home: Path, **flags: Any) -> DaemonConfig:
    """The daemon's settings: each flag given (not None) over the file's value over the default."""
    cfg, _ = load(config, home)
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        merged = DaemonConfig.model_validate({**cfg.model_dump(exclude_unset=True), **given})
    except ValidationError as e:
        key, msg = _first(e)
        raise ConfigError(f"{flag(key)} {given.get(key)!r}: {msg}") from None
    merged._sources.update({**cfg._sources, **{k: flag(k) for k in given}})
    return merged


def _first(e: ValidationError) -> tuple[str, str]:
    """(dotted key, message) of the first error, worded as lab.py words rloop.toml's."""
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top)"
    if err["type"] == "extra_forbidden":
        return key, "unknown key"
    return key, err["msg"].removeprefix("Value error, ")


# --- the size cap ---

def cap_pages(conn: sqlite3.Connection, max_db_mb: float | None) -> None:
    """Cap this connection's database at `max_db_mb` MiB (SQLite keeps a cap below the current size at that
    size: nothing written is ever refused to a reader, only new pages)."""
    if max_db_mb is not None:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {max(1, int(max_db_mb * MIB) // page_size)}")


def db_bytes(db: Path) -> int:
    """The database's size as its writers see it (pages in the -wal file included)."""
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()


def cap_reached(cfg: DaemonConfig, home: Path, why: str) -> str:
    """`why`, a storage error, or a line saying what to do when it is the cap and not the disk that is full:
    SQLite says "database or disk is full" for both; it is the cap when the disk still has room for the
    database to grow to it."""
    if cfg.max_db_mb is None or "database or disk is full" not in why:
        return why
    try:
        size = db_bytes(home / "events.db")
        free = shutil.disk_usage(home).free
    except (OSError, sqlite3.Error):
        return why
    if free < cfg.max_db_mb * MIB - size:
        return why
    return (f"events.db reached max_db_mb={cfg.max_db_mb:g} ({size / MIB:.2f} MiB): raise it"
            f"{where(cfg, 'max_db_mb')} and restart the daemon; the runs go on from where they stopped")


def where(cfg: DaemonConfig, key: str) -> str:
    src = cfg.source(key)
    if src is None:
        return ""
    return f" ({src})" if src.startswith("--") else f" (in {src})"

