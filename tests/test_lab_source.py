"""The lab's data: the synthetic process knows its exact next-byte distribution; splits, cache, text, enwik8."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


source = load_module("lab_source_under_test", ROOT / "frozen" / "private" / "source.py")
data = load_module("lab_data_under_test", ROOT / "frozen" / "data.py")


def test_generation_is_deterministic_and_streams_differ():
    a = source.generate(5, "val", 4000)
    assert a == source.generate(5, "val", 4000)
    assert a != source.generate(5, "train", 4000) and a != source.generate(6, "val", 4000)
    assert a[:1000] == source.generate(5, "val", 1000)  # a prefix is the same stream


def test_every_distribution_is_proper_and_every_emitted_byte_possible():
    sample = source.generate(11, "val", 20000)
    proc = source.Process(source.Language(11))
    for byte in sample:
        dist = proc.dist()
        assert math.isclose(sum(p for _, p in dist), 1.0, abs_tol=1e-9)
        assert len({b for b, _ in dist}) == len(dist)
        assert proc.prob(byte) > 0
        proc.push(byte)
    bits = source.surprisal_bits(11, sample)
    assert len(bits) == len(sample) - 1 and all(math.isfinite(b) for b in bits)
    assert source.oracle_bpb(11, sample) == pytest.approx(sum(bits) / len(bits))


def test_structure_at_several_ranges():
    sample = source.generate(3, "train", 60000).decode()
    stack = []
    for c in sample:  # brackets always close the innermost open kind
        if c in "([{":
            stack.append(c)
        elif c in ")]}":
            assert "([{"[")]}".index(c)] == stack.pop()
    copies = 0
    for i, c in enumerate(sample):  # every `=` repeats the last recorded <span> verbatim
        if c == "=" and i > 0:
            start = sample.rfind("<", 0, i)
            span = sample[start + 1:sample.index(">", start)]
            assert sample[i + 1:i + 1 + len(span)] == span or i + 1 + len(span) > len(sample)
            copies += 1
    assert copies > 20
    floor = source.oracle_bpb(3, sample.encode())
    assert 0.8 < floor < 2.5  # structured, far from both 0 and 8 bits


def test_a_few_megabytes_take_seconds():
    t0 = time.monotonic()
    source.generate(1, "train", 500_000)
    assert time.monotonic() - t0 < 15


def test_replay_accepts_bytes_the_process_never_emits():
    proc = source.Process(source.Language(2))
    for byte in b"<ab>=\x00\xff)))(((<<==":
        proc.push(byte)
        assert math.isclose(sum(p for _, p in proc.dist()), 1.0, abs_tol=1e-9)


def test_splits_are_cached_privately_and_the_test_split_depends_on_the_secret(tmp_path):
    cache = tmp_path / "cache"
    t0 = time.monotonic()
    first = data.load("synthetic:32K", 9, "s3cret", 4096, cache)
    cold = time.monotonic() - t0
    assert len(first.train) == 32 * 1024 and len(first.val) == len(first.test) == 4096
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert not any("s3cret" in p.name for p in cache.iterdir())
    t0 = time.monotonic()
    again = data.load("synthetic:32K", 9, "s3cret", 4096, cache)
    assert time.monotonic() - t0 < cold
    assert (again.train, again.val, again.test) == (first.train, first.val, first.test)
    assert again.oracle_val == first.oracle_val == source.oracle_bpb(9, first.val)
    other = data.load("synthetic:32K", 9, "another", 4096, cache)
    assert other.val == first.val and other.train == first.train and other.test != first.test
    assert data.load("synthetic:32K", 10, "s3cret", 4096, cache).val != first.val
    assert first.val not in first.train and first.test[:64] not in first.train


def test_text_source_splits_in_order(tmp_path):
    text = bytes(range(256)) * 100
    (tmp_path / "corpus.txt").write_bytes(text)
    s = data.load(f"text:{tmp_path / 'corpus.txt'}", 0, "", 500, None)
    assert s.train == text[:len(s.train)] and len(s.train) == len(text) - 2 * int(len(text) * 0.05)
    assert len(s.val) == len(s.test) == 500 and s.oracle_val is None
    with pytest.raises(data.DataError):
        data.load(f"text:{tmp_path / 'missing.txt'}", 0, "", 500, None)


def test_enwik8_downloads_once_from_a_url(tmp_path):
    corpus = b"<page><title>Anarchism</title><text>" + b"some wiki text " * 4000 + b"</text></page>"
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8", corpus)
    cache = tmp_path / "cache"
    s = data.load(f"enwik8:{archive.as_uri()}", 0, "", 1000, cache)
    assert s.train == corpus[:len(s.train)] and len(s.val) == 1000 and s.source == "enwik8"
    archive.unlink()  # the second load reads the cached download
    assert data.load(f"enwik8:{archive.as_uri()}", 0, "", 1000, cache).val == s.val
    with pytest.raises(data.DataError, match="cannot download"):
        data.load(f"enwik8:{(tmp_path / 'nowhere.zip').as_uri()}", 0, "", 1000, cache)


def test_unknown_source_is_a_data_error():
    with pytest.raises(data.DataError, match="unknown source"):
        data.load("imagenet", 0, "", 100, None)
