"""Content-addressed blob store: bytes named by their sha256, fsynced before any event names them."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from rloopd.errors import BlobCorrupt, BlobMissing

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Blobs live at `<root>/sha256/<first two hex>/<rest>`; writing is idempotent and durable.

    Example:
        store = BlobStore(home / "blobs")
        ref = store.put(b"hello")   # the sha256 hex digest
        assert store.get(ref) == b"hello"
    """

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise BlobMissing(f"not a blob digest: {digest!r}")
        return self.root / "sha256" / digest[:2] / digest[2:]

    def put(self, data: bytes) -> str:
        """Store `data` durably (file and directory fsynced) and return its digest."""
        digest = digest_of(data)
        final = self.path(digest)
        if final.exists():
            return digest
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return digest

    def put_file(self, path: Path) -> str:
        return self.put(Path(path).read_bytes())

    def put_text(self, text: str) -> str:
        return self.put(text.encode("utf-8"))

    def exists(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def get(self, digest: str) -> bytes:
        """The blob's bytes, verified against its name."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobMissing(f"blob {digest} is missing from {self.root}") from None
        if digest_of(data) != digest:
            raise BlobCorrupt(f"blob {digest} is corrupt: its bytes hash to {digest_of(data)}")
        return data

    def get_text(self, digest: str) -> str:
        return self.get(digest).decode("utf-8")

    def verify(self, digest: str) -> str | None:
        """None when the blob is present and intact, else a one-line reason."""
        try:
            self.get(digest)
        except (BlobMissing, BlobCorrupt) as e:
            return str(e)
        return None
