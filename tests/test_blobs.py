"""The content-addressed blob store."""

from __future__ import annotations

import pytest

from rloopd.blobs import BlobStore, digest_of
from rloopd.errors import BlobCorrupt, BlobMissing


def test_put_get_is_content_addressed_and_idempotent(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    a = store.put(b"hello")
    assert a == digest_of(b"hello") and store.put(b"hello") == a
    assert store.get(a) == b"hello" and store.path(a).parent.name == a[:2]
    assert not list(store.root.rglob(".tmp-*")), "no temporary file is left behind"


def test_verified_on_read(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    a = store.put(b"weights")
    store.path(a).write_bytes(b"weightz")
    with pytest.raises(BlobCorrupt, match=a):
        store.get(a)
    store.path(a).unlink()
    with pytest.raises(BlobMissing):
        store.get(a)
    with pytest.raises(BlobMissing, match="not a blob digest"):
        store.get("../../etc/passwd")
