"""The blob store interface. An S3 backend implements the same methods."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol


class BlobTooLarge(Exception):
    """The stream went past the size limit; nothing was stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int


class StagedBlob(Protocol):
    """A blob written to a private staging area: validated first, then committed or discarded."""

    path: Path
    sha256: str
    size: int

    def commit(self) -> StoredBlob: ...

    def discard(self) -> None: ...


class BlobStore(Protocol):
    def stage(self, source: BinaryIO, *, limit: int) -> StagedBlob:
        """Copy ``source`` in chunks to staging, hashing as it goes; ``BlobTooLarge`` past ``limit``."""
        ...

    def stage_bytes_from(self, chunks: Iterator[bytes], *, limit: int) -> StagedBlob:
        """The same from an iterator of byte chunks (blobs the service makes itself)."""
        ...

    def stage_written(self, write: Callable[[Path], object]) -> StagedBlob:
        """A file that ``write`` creates at the path it is given (a library's own writer, such as safetensors'
        ``save_file``), staged without a second copy: written once where the store stages, then hashed by
        reading it once."""
        ...

    def local_path(self, sha256: str) -> AbstractContextManager[Path]:
        """A local file holding the blob, for as long as the context is open."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None: ...

    def ready(self) -> bool:
        """Whether the store can be written now (``/readyz``)."""
        ...
