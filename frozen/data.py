"""The lab's data: the train, validation and hidden test splits of a source, cached in the judge's own directory.

Only the judge imports this module. Sources:
- `synthetic` or `synthetic:SIZE` (default): the private generator (frozen/private/source.py). The language
  and the train and validation samples come from the data seed; the test sample also from the test secret.
  Each split is an independent stream started from scratch, so the exact floor of every position is known.
  SIZE is the train split (e.g. `synthetic:64M`; default 2M bytes); validation and test are --eval-bytes each.
- `text:PATH`: a local file, split 90 / 5 / 5 % in order; validation and test are capped at --eval-bytes.
- `enwik8` or `enwik8:URL`: downloaded once into the cache (any URL urllib opens, file:// included), then the
  standard 90M / 5M / 5M split; validation and test capped at --eval-bytes.
Text sources have no floor (oracle_bpb is null) and no secret part: their test split is public text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
DEFAULT_SYNTHETIC_TRAIN = 2_000_000


class DataError(Exception):
    """The source cannot be read, downloaded or parsed."""


@dataclass
class Splits:
    train: bytes
    val: bytes
    test: bytes
    oracle_val: float | None = None   # the floor on the validation positions, where the source knows it
    oracle_test: float | None = None
    source: str = "synthetic"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", text.strip())
    if not m:
        raise DataError(f"bad size {text!r}: expected e.g. 65536, 512K or 16M")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def private_dir(path: Path) -> Path:
    """Create (or tighten) a directory only this uid can enter: the cache holds the hidden split."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        path.chmod(0o700)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _generator():
    spec = importlib.util.spec_from_file_location("rloop_lab_source", HERE / "private" / "source.py")
    if spec is None or not (HERE / "private" / "source.py").exists():
        raise DataError("frozen/private/source.py is missing: the synthetic source is private to the judge's copy")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic_split(gen, cache: Path | None, seed: int, stream: str, n: int) -> tuple[bytes, float | None]:
    """One split and its floor; the cache file name hides the stream name (the test stream holds the secret)."""
    key = hashlib.sha256(f"v{gen.VERSION}:{seed}:{stream}:{n}".encode()).hexdigest()[:24]
    path = cache / f"synthetic-v{gen.VERSION}-{key}.bin" if cache else None
    floor_path = path.with_suffix(".json") if path else None
    want_floor = not stream.startswith("train")
    if path and path.exists() and (not want_floor or floor_path.exists()):
        data = path.read_bytes()
        floor = json.loads(floor_path.read_text())["oracle_bpb"] if want_floor else None
        return data, floor
    data = gen.generate(seed, stream, n)
    floor = gen.oracle_bpb(seed, data) if want_floor else None
    if path:
        _atomic_write(path, data)
        if want_floor:
            _atomic_write(floor_path, json.dumps({"oracle_bpb": floor}).encode())
    return data, floor


def synthetic(spec: str, data_seed: int, test_secret: str, eval_bytes: int, cache: Path | None) -> Splits:
    n_train = parse_size(spec) if spec else DEFAULT_SYNTHETIC_TRAIN
    gen = _generator()
    train, _ = _synthetic_split(gen, cache, data_seed, "train", n_train)
    val, oracle_val = _synthetic_split(gen, cache, data_seed, "val", eval_bytes)
    test, oracle_test = _synthetic_split(gen, cache, data_seed, f"test:{test_secret}", eval_bytes)
    return Splits(train, val, test, oracle_val, oracle_test, "synthetic")


def split_corpus(data: bytes, eval_bytes: int, source: str, val_frac: float = 0.05) -> Splits:
    if len(data) < 1000:
        raise DataError(f"{source}: only {len(data)} bytes; a text source needs at least 1000")
    n_eval = int(len(data) * val_frac)
    n_train = len(data) - 2 * n_eval
    val, test = data[n_train:n_train + n_eval], data[n_train + n_eval:]
    return Splits(data[:n_train], val[:eval_bytes], test[:eval_bytes], source=source)


def download(url: str, dest: Path) -> Path:
    """Fetch url into dest once (atomically); file:// URLs work, which is how the tests exercise it."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"cannot download {url}: {e}") from e
    return dest


def enwik8(url: str, eval_bytes: int, cache: Path | None) -> Splits:
    where = cache or Path(tempfile.mkdtemp(prefix="rloop-enwik8-"))
    archive = download(url, where / f"enwik8-{hashlib.sha256(url.encode()).hexdigest()[:12]}.zip")
    try:
        with zipfile.ZipFile(archive) as z:
            data = z.read("enwik8")
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{archive}: not a zip with a member named enwik8 ({e})") from e
    if len(data) == 100_000_000:  # the real file: the standard split of the literature
        return Splits(data[:90_000_000], data[90_000_000:95_000_000][:eval_bytes],
                      data[95_000_000:][:eval_bytes], source="enwik8")
    return split_corpus(data, eval_bytes, "enwik8")


def load(source: str, data_seed: int, test_secret: str, eval_bytes: int, cache: Path | None) -> Splits:
    """The splits of a source spec (see the module docstring)."""
    kind, _, arg = source.partition(":")
    if cache is not None:
        private_dir(cache)
    if kind == "synthetic":
        return synthetic(arg, data_seed, test_secret, eval_bytes, cache)
    if kind == "text":
        try:
            return split_corpus(Path(arg).read_bytes(), eval_bytes, source)
        except OSError as e:
            raise DataError(f"{source}: {e}") from e
    if kind == "enwik8":
        return enwik8(arg or ENWIK8_URL, eval_bytes, cache)
    raise DataError(f"unknown source {source!r}: expected synthetic[:SIZE], text:PATH or enwik8[:URL]")
