"""Content-addressed blob storage. ``BlobStore`` is the interface; ``LocalBlobStore`` the filesystem backend."""

from service.storage.base import BlobStore, BlobTooLarge, StoredBlob
from service.storage.local import LocalBlobStore

__all__ = ["BlobStore", "BlobTooLarge", "LocalBlobStore", "StoredBlob"]
