"""A STOW-RS request body, streamed: ``multipart/related; type="application/dicom"`` parsed as it arrives
(python-multipart's parser) into one temporary file per part, under a byte cap, so a large request costs disk,
not memory, and one over the cap is refused as soon as it passes it.

The body must end with its closing delimiter and hold at least one part; a body cut short is refused whole,
since its last part would be a truncated instance (PS3.18 10.5: 400 Bad Request, 409 Conflict when there is
nothing to store, 413 Payload Too Large, 415 Unsupported Media Type).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

DICOM = b"application/dicom"


class StowBodyError(ValueError):
    """The request body is refused as a whole; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ReceivedPart:
    path: Path
    content_type: str = ""
    size: int = 0


@dataclass
class _Current:
    part: ReceivedPart
    file: BinaryIO
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)


class MultipartReceiver:
    """Feed it the body chunk by chunk; :meth:`finish` returns the parts, each in its own file under `folder`.
    Whatever happens, :meth:`discard` removes every file it made."""

    def __init__(self, content_type: str, folder: Path, max_bytes: int) -> None:
        media_type, options = parse_options_header(content_type)
        if media_type != b"multipart/related":
            raise StowBodyError(415, 'expected multipart/related; type="application/dicom"')
        declared = options.get(b"type", DICOM).lower()
        if declared != DICOM:
            raise StowBodyError(415, f"multipart type {declared.decode('latin-1')!r} is not application/dicom")
        boundary = options.get(b"boundary", b"")
        if not boundary:
            raise StowBodyError(400, "multipart/related without a boundary")
        self._folder = folder
        self._max_bytes = max_bytes
        self._received = 0
        self._ended = False
        self._current: _Current | None = None
        self.parts: list[ReceivedPart] = []
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_part_data": self._data,
                "on_part_end": self._end_part,
                "on_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise StowBodyError(413, f"request body larger than {self._max_bytes} bytes (CCFNET_STOW_MAX_REQUEST_MB)")
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise StowBodyError(400, f"malformed multipart body: {exc}") from exc

    def finish(self) -> list[ReceivedPart]:
        if self._current is not None or not self._ended:
            raise StowBodyError(400, "multipart body ends without its closing delimiter (truncated?)")
        if not self.parts:  # well formed, but nothing to store: as when every instance fails (PS3.18 10.5.3)
            raise StowBodyError(409, "multipart body without any part: nothing to store")
        return self.parts

    def discard(self) -> None:
        if self._current is not None:
            self._current.file.close()
            self._current = None
        for part in self.parts:
            with contextlib.suppress(FileNotFoundError):
                part.path.unlink()

    # parser callbacks --------------------------------------------------------------------------------
    def _begin(self) -> None:
        path = self._folder / f"stow-{uuid.uuid4().hex}.part"
        part = ReceivedPart(path)
        self.parts.append(part)  # listed at once, so discard() finds it whatever happens next
        self._current = _Current(part, open(path, "xb"))  # noqa: SIM115  (closed in _end_part or discard)
        os.chmod(path, 0o640)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.header_field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.header_value += data[start:end]

    def _header_end(self) -> None:
        current = self._current
        assert current is not None
        if bytes(current.header_field).strip().lower() == b"content-type":
            current.part.content_type = parse_options_header(bytes(current.header_value))[0].decode("latin-1")
        current.header_field.clear()
        current.header_value.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None
        self._current.file.write(data[start:end])
        self._current.part.size += end - start

    def _end_part(self) -> None:
        assert self._current is not None
        self._current.file.close()
        self._current = None

    def _end(self) -> None:
        self._ended = True
