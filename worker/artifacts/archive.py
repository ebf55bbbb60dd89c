"""Safe extraction of an uploaded model directory (``.tar``, ``.tar.gz``, ``.zip``).

Only regular files and folders are accepted: links (symbolic or hard), devices, absolute paths and ``..``
components are refused before anything is written. The number of members and the decompressed size are
bounded, the size while the bytes are written (a member's declared size is not trusted), so an archive bomb
stops at the limit. Files are written below the target folder only, flattened to their paths inside it.
"""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

from worker.artifacts.errors import ArtifactError

MAX_MEMBERS = 256
CHUNK = 1024 * 1024
FIELD = "archive"


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = MAX_MEMBERS
    max_bytes: int = 4 * 1024**3  # decompressed, all members together


def detect_archive(path: Path) -> str:
    """``zip`` or ``tar`` (plain or gzip-compressed), from the file's content."""
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError):
        pass
    raise ArtifactError("the archive is not a .tar, .tar.gz or .zip file", field=FIELD)


def safe_member_path(name: str) -> PurePosixPath:
    """The member's relative path; ArtifactError for absolute paths, ``..`` or odd names."""
    if "\\" in name or "\x00" in name:
        raise ArtifactError(f"archive member {name!r}: backslashes and NUL characters are not accepted", field=FIELD)
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith("/"):
        raise ArtifactError(f"archive member {name!r} has an absolute path", field=FIELD)
    if any(part == ".." for part in path.parts):
        raise ArtifactError(f"archive member {name!r} leaves the archive's folder (`..`)", field=FIELD)
    parts = [part for part in path.parts if part != "."]
    if not parts:
        raise ArtifactError(f"archive member {name!r} has an empty path", field=FIELD)
    return PurePosixPath(*parts)


def extract_archive(path: Path, target: Path, limits: ArchiveLimits = ArchiveLimits()) -> list[Path]:
    """Extract into the (empty) folder ``target``; returns the regular files written (relative to it)."""
    kind = detect_archive(path)
    written: list[Path] = []
    budget = _Budget(limits.max_bytes)
    try:
        members = _zip_members(path) if kind == "zip" else _tar_members(path)
        count = 0
        for relative, opener in members:
            count += 1
            if count > limits.max_members:
                raise ArtifactError(f"the archive has more than {limits.max_members} members", field=FIELD)
            if opener is None:  # a folder
                continue
            destination = target.joinpath(*relative.parts)
            if destination.exists():
                raise ArtifactError(f"archive member {str(relative)!r} appears twice", field=FIELD)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with opener() as source, open(destination, "xb") as sink:
                budget.copy(source, sink)
            written.append(Path(*relative.parts))
    except ArtifactError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile, ValueError) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise ArtifactError(f"the archive could not be read: {exc}", field=FIELD) from None
    return written


class _Budget:
    """Counts the decompressed bytes written, refusing past the limit."""

    def __init__(self, max_bytes: int) -> None:
        self.left = max_bytes
        self.max_bytes = max_bytes

    def copy(self, source: IO[bytes], sink: IO[bytes]) -> None:
        while chunk := source.read(CHUNK):
            self.left -= len(chunk)
            if self.left < 0:
                raise ArtifactError(f"the archive decompresses to more than {self.max_bytes:,} bytes", field=FIELD)
            sink.write(chunk)


MemberOpener = Callable[[], IO[bytes]]


def _zip_members(path: Path) -> Iterator[tuple[PurePosixPath, MemberOpener | None]]:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            relative = safe_member_path(info.filename)
            mode = (info.external_attr >> 16) & 0o170000
            if mode not in (0, 0o100000, 0o040000):  # symbolic links and special files carry their type here
                raise ArtifactError(f"archive member {info.filename!r} is a link or special file", field=FIELD)
            if info.is_dir():
                yield relative, None
                continue
            yield relative, partial(_zip_stream, archive, info)


def _tar_members(path: Path) -> Iterator[tuple[PurePosixPath, MemberOpener | None]]:
    with tarfile.open(path, mode="r:*") as archive:
        for info in archive:
            relative = safe_member_path(info.name)
            if info.isdir():
                yield relative, None
                continue
            if not info.isreg():
                raise ArtifactError(f"archive member {info.name!r} is a link or special file", field=FIELD)
            yield relative, partial(_tar_stream, archive, info)


def _zip_stream(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> IO[bytes]:
    return archive.open(info)


def _tar_stream(archive: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    stream = archive.extractfile(info)
    if stream is None:
        raise ArtifactError(f"archive member {info.name!r} cannot be read", field=FIELD)
    return stream
