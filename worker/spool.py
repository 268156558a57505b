"""The durable spool: ``<spool>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.

A file is written under ``<spool>/.incoming``, fsynced, renamed into place and its folder fsynced;
only then is the database row committed and success reported (DESIGN.md step 2). UIDs are validated with
pydicom's UID rule before they become path parts, so no UID can name a path outside the spool.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID

INCOMING = ".incoming"
SUFFIX = ".dcm"


class SpoolError(Exception):
    """Base class of spool failures."""


class InvalidUIDError(SpoolError):
    """A UID is missing, malformed or would not make a safe path part."""


class LowDiskError(SpoolError):
    """Not enough free space to accept an instance."""


def validate_uid(value: object, what: str) -> str:
    """Return the UID if it is a valid DICOM UID (pydicom's regex, at most 64 characters)."""
    if value is None:
        raise InvalidUIDError(f"{what} is missing")
    text = str(value).strip("\x00 ")
    if not text:
        raise InvalidUIDError(f"{what} is empty")
    if not UID(text).is_valid:
        raise InvalidUIDError(f"{what} is not a valid UID")
    return text


@dataclass(frozen=True)
class SpoolPaths:
    final: Path
    relative: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Durable storage of received instances under one root folder."""

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = root.resolve()
        self.incoming = self.root / INCOMING
        self.min_free_bytes = min_free_bytes

    def prepare(self) -> int:
        """Create the folders and delete temporary files left by a crash; return how many were removed."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        removed = 0
        for leftover in self.incoming.iterdir():
            if leftover.is_file():
                leftover.unlink()
                removed += 1
        return removed

    def paths_for(self, study_uid: str, series_uid: str, sop_uid: str) -> SpoolPaths:
        parts = [
            validate_uid(study_uid, "StudyInstanceUID"),
            validate_uid(series_uid, "SeriesInstanceUID"),
            validate_uid(sop_uid, "SOPInstanceUID"),
        ]
        final = (self.root / parts[0] / parts[1] / (parts[2] + SUFFIX)).resolve()
        if not final.is_relative_to(self.root) or final.parent.parent.parent != self.root:
            raise InvalidUIDError("UID would leave the spool folder")
        return SpoolPaths(final=final, relative=final.relative_to(self.root).as_posix())

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, needed: int) -> None:
        if self.free_bytes() - needed < self.min_free_bytes:
            raise LowDiskError("free disk space below CCFNET_MIN_FREE_DISK_MB")

    def write(self, paths: SpoolPaths, data: bytes | memoryview) -> int:
        """Write durably: temp file, fsync, rename, fsync of the folder(s). Leaves nothing on failure."""
        self.check_space(len(data))
        tmp = self.incoming / f"{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            created = self._make_parents(paths.final.parent)
            os.replace(tmp, paths.final)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise LowDiskError("disk full while writing an instance") from exc
            raise
        _fsync_dir(paths.final.parent)
        for folder in created:
            _fsync_dir(folder.parent)
        return len(data)

    def _make_parents(self, folder: Path) -> list[Path]:
        """mkdir -p, returning the folders it created (their parents need an fsync too)."""
        created: list[Path] = []
        for candidate in (folder.parent, folder):
            try:
                candidate.mkdir()
                created.append(candidate)
            except FileExistsError:
                pass
        return created

    def remove(self, paths: SpoolPaths) -> None:
        """Undo a write whose database commit failed (only for instances that were not there before)."""
        with contextlib.suppress(FileNotFoundError):
            paths.final.unlink()
