"""Blobs as files under ``root/ab/cd/<sha256>``, written through ``root/staging`` and renamed into place."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from service.storage.base import BlobTooLarge, StoredBlob

CHUNK_BYTES = 1 << 20


@dataclass
class LocalStagedBlob:
    store: LocalBlobStore
    path: Path
    sha256: str
    size: int

    def commit(self) -> StoredBlob:
        final = self.store.path_for(self.sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            self.path.unlink(missing_ok=True)
        else:
            os.replace(self.path, final)
        return StoredBlob(self.sha256, self.size)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class LocalBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / "staging"
        self.staging.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def stage(self, source: BinaryIO, *, limit: int) -> LocalStagedBlob:
        return self.stage_bytes_from(iter(lambda: source.read(CHUNK_BYTES), b""), limit=limit)

    def stage_bytes_from(self, chunks: Iterator[bytes], *, limit: int) -> LocalStagedBlob:
        digest = hashlib.sha256()
        size = 0
        handle, name = tempfile.mkstemp(dir=self.staging, prefix="upload-")
        path = Path(name)
        try:
            with os.fdopen(handle, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise BlobTooLarge(limit)
                    digest.update(chunk)
                    out.write(chunk)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return LocalStagedBlob(self, path, digest.hexdigest(), size)

    def stage_written(self, write: Callable[[Path], object]) -> LocalStagedBlob:
        handle, name = tempfile.mkstemp(dir=self.staging, prefix="written-")
        os.close(handle)
        path = Path(name)
        try:
            write(path)
            digest = hashlib.sha256()
            with open(path, "rb") as written:
                for chunk in iter(lambda: written.read(CHUNK_BYTES), b""):
                    digest.update(chunk)
            return LocalStagedBlob(self, path, digest.hexdigest(), path.stat().st_size)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @contextmanager
    def local_path(self, sha256: str) -> Iterator[Path]:
        path = self.path_for(sha256)
        if not path.exists():
            raise FileNotFoundError(f"blob {sha256} is missing from storage")
        yield path

    def exists(self, sha256: str) -> bool:
        return self.path_for(sha256).exists()

    def delete(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)

    def ready(self) -> bool:
        return self.staging.is_dir() and os.access(self.staging, os.W_OK)
