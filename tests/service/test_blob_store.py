"""The local blob store: files the service makes itself (fits, edited weights) are written once, in its staging
area, hashed, and renamed into place; a writer that fails leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service.db.base import Base
from service.db.tables import Blob
from service.storage.local import LocalBlobStore
from worker.attribution import Examples, FitOptions, fit_curvature
from worker.loading import load_curvatures, put_curvatures


def test_a_written_file_is_staged_hashed_and_committed_without_a_copy(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    content = os.urandom(3 * (1 << 20) + 17)  # more than one hashing chunk
    written: list[Path] = []

    def write(path: Path) -> None:
        assert path.parent == store.staging  # written where the store renames from
        written.append(path)
        path.write_bytes(content)

    staged = store.stage_written(write)
    assert staged.sha256 == hashlib.sha256(content).hexdigest() and staged.size == len(content)
    inode = written[0].stat().st_ino
    stored = staged.commit()
    final = store.path_for(stored.sha256)
    assert final.read_bytes() == content
    assert final.stat().st_ino == inode  # the same file, renamed: never copied
    assert list(store.staging.iterdir()) == []
    # the same content again: the blob is already there, the new staging file goes
    assert store.stage_written(lambda path: path.write_bytes(content)).commit() == stored
    assert list(store.staging.iterdir()) == []


def test_a_failing_writer_leaves_nothing_staged(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")

    def write(path: Path) -> None:
        path.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        store.stage_written(write)
    assert list(store.staging.iterdir()) == []


def test_a_fit_goes_into_the_store_once_and_loads_back_equal(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    Base.metadata.create_all(engine)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    train = Examples(torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,)))
    curvature = fit_curvature(model, train, "cross_entropy", FitOptions(strategy="ekfac", batch_size=16))
    with Session(engine) as session:
        stored = put_curvatures(session, store, {"model": curvature})
        assert session.get(Blob, stored.sha256) is not None
        session.commit()
    assert list(store.staging.iterdir()) == []
    loaded = load_curvatures(store, stored.sha256)["model"].to_tensors()
    expected = curvature.to_tensors()
    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
