"""The bad-input table (issue 24, docs/conformance.md "Refused instances"): each kind of broken instance gets
the failure status that names its problem, with an Error Comment; nothing of it stays in the spool or the
database; the listener keeps serving. Sent with pynetdicom exactly as the bytes are written (chunked send)."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dicom_factory as f
import numpy as np
import pydicom
import pytest
from intake_support import (
    MR,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    send,
    spool_files,
)
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from sqlalchemy import func, select

from worker.db.models import Instance, Study
from worker.listener.status import StoreStatus
from worker.service import Service

pytestmark = pytest.mark.services
CT = "1.2.840.10008.5.1.4.1.1.2"


def _image(**kwargs: object) -> Dataset:
    uids = f.new_study()
    ds = f.mr_image(uids.study, uids.series[0], **kwargs)  # type: ignore[arg-type]
    del ds.file_meta
    return ds


def _body(ds: Dataset, implicit: bool = False) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _file(folder: Path, name: str, body: bytes, *, sop_uid: str, syntax: str = ExplicitVRLittleEndian,
          sop_class: str = MR) -> Path:
    from pynetdicom.dsutils import encode_file_meta

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1234.1"
    path = folder / f"{name}.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body)
    return path


def _native(folder: Path, name: str, ds: Dataset, **kwargs: object) -> Path:
    return _file(folder, name, _body(ds), sop_uid=str(ds.get("SOPInstanceUID") or generate_uid()), **kwargs)  # type: ignore[arg-type]


def _compressed(ds: Dataset, syntax: str, frame: bytes | None = None) -> Dataset:
    """`ds` with its pixels compressed in `syntax` (or with `frame` as its one encapsulated frame)."""
    out = copy.deepcopy(ds)
    if frame is None:
        out.file_meta = FileMetaDataset()
        out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.compress(syntax)
        del out.file_meta
    else:
        out.PixelData = encapsulate([frame])
        out["PixelData"].VR = "OB"
        out["PixelData"].is_undefined_length = True
    return out


def _jpeg_baseline_frame() -> tuple[Dataset, bytes]:
    """An 8-bit image and a real JPEG Baseline codestream of it (GDCM or pylibjpeg cannot encode baseline:
    use DCMTK when present, else skip)."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (DCMTK) missing")
    ds = _image(bits=8)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        full = copy.deepcopy(ds)
        full.file_meta = FileMetaDataset()
        full.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        full.save_as(src, enforce_file_format=True)
        subprocess.run(["dcmcjpeg", "+eb", str(src), str(out)], check=True, capture_output=True, timeout=60)
        from pydicom.encaps import generate_frames

        encoded = pydicom.dcmread(out)
        frame = next(generate_frames(encoded.PixelData, number_of_frames=1))
    return ds, frame


@dataclass(frozen=True)
class BadInput:
    name: str
    status: StoreStatus
    build: Callable[[Path], Path]


def bad_inputs() -> list[BadInput]:
    cases: list[BadInput] = []

    def add(name: str, status: StoreStatus) -> Callable[[Callable[[Path], Path]], None]:
        def register(build: Callable[[Path], Path]) -> None:
            cases.append(BadInput(name, status, build))
        return register

    @add("pixel-data-truncated", StoreStatus.PIXEL_DATA_LENGTH_MISMATCH)
    def _(folder: Path) -> Path:
        ds = _image()
        ds.PixelData = ds.PixelData[: len(ds.PixelData) - 1000]
        return _native(folder, "pixel-data-truncated", ds)

    @add("pixel-data-longer-than-declared", StoreStatus.PIXEL_DATA_LENGTH_MISMATCH)
    def _(folder: Path) -> Path:
        ds = _image()
        ds.PixelData = ds.PixelData + b"\x00\x01" * 64
        return _native(folder, "pixel-data-longer-than-declared", ds)

    @add("rows-with-two-values", StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    def _(folder: Path) -> Path:  # Rows (US) with a value length of 4: two values
        ds = _image()
        ds["Rows"] = DataElement(0x00280010, "US", [64, 64])
        return _native(folder, "rows-with-two-values", ds)

    @add("bits-allocated-12", StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    def _(folder: Path) -> Path:
        ds = _image()
        ds.BitsAllocated = 12
        return _native(folder, "bits-allocated-12", ds)

    @add("image-without-rows", StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    def _(folder: Path) -> Path:
        ds = _image()
        del ds.Rows
        return _native(folder, "image-without-rows", ds)

    @add("image-without-pixel-data", StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    def _(folder: Path) -> Path:
        ds = _image()
        del ds.PixelData
        return _native(folder, "image-without-pixel-data", ds)

    @add("missing-study-uid", StoreStatus.INVALID_UID)
    def _(folder: Path) -> Path:
        ds = _image()
        del ds.StudyInstanceUID
        return _native(folder, "missing-study-uid", ds)

    @add("invalid-series-uid", StoreStatus.INVALID_UID)
    def _(folder: Path) -> Path:
        ds = _image()
        ds.SeriesInstanceUID = "1.2/3.4"
        return _native(folder, "invalid-series-uid", ds)

    @add("sop-uid-path-traversal", StoreStatus.INVALID_UID)
    def _(folder: Path) -> Path:
        ds = _image()
        ds.SOPInstanceUID = "../../etc"
        return _native(folder, "sop-uid-path-traversal", ds)

    @add("zero-length-dataset", StoreStatus.DATASET_DECODE_FAILED)
    def _(folder: Path) -> Path:
        return _file(folder, "zero-length-dataset", b"", sop_uid=generate_uid())

    @add("sop-class-not-ours-in-mr-context", StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    def _(folder: Path) -> Path:
        ds = _image()
        ds.SOPClassUID = CT
        return _native(folder, "sop-class-not-ours-in-mr-context", ds)

    @add("sop-instance-differs-from-request", StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS)
    def _(folder: Path) -> Path:
        return _file(folder, "sop-instance-differs-from-request", _body(_image()), sop_uid=generate_uid())

    @add("2gb-declared-length", StoreStatus.DATASET_DECODE_FAILED)
    def _(folder: Path) -> Path:
        ds = _image()
        body = _body(ds)
        tag = b"\xe0\x7f\x10\x00OW\x00\x00"  # Pixel Data, explicit VR OW: 4-byte length follows
        at = body.index(tag) + len(tag)
        return _file(folder, "2gb-declared-length", body[:at] + (0x7FFFFFF0).to_bytes(4, "little")
                     + body[at + 4:], sop_uid=ds.SOPInstanceUID)

    @add("garbage", StoreStatus.DATASET_DECODE_FAILED)
    def _(folder: Path) -> Path:
        return _file(folder, "garbage", bytes(range(256)) * 8, sop_uid=generate_uid())

    @add("corrupt-jpeg-baseline", StoreStatus.PIXEL_DATA_UNDECODABLE)
    def _(folder: Path) -> Path:
        ds, frame = _jpeg_baseline_frame()
        broken = frame[:2] + b"\x00" * 200 + frame[202:]  # SOI kept, the frame header and tables gone
        return _native(folder, "corrupt-jpeg-baseline", _compressed(ds, JPEGBaseline8Bit, broken),
                       syntax=JPEGBaseline8Bit)

    @add("corrupt-jpeg-2000", StoreStatus.PIXEL_DATA_UNDECODABLE)
    def _(folder: Path) -> Path:
        ds = _compressed(_image(), JPEG2000Lossless)
        from pydicom.encaps import generate_frames

        frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
        frame[len(frame) // 2: len(frame) // 2 + 64] = b"\xff" * 64
        return _native(folder, "corrupt-jpeg-2000", _compressed(ds, JPEG2000Lossless, bytes(frame)),
                       syntax=JPEG2000Lossless)

    @add("rle-with-too-few-segments", StoreStatus.PIXEL_DATA_UNDECODABLE)
    def _(folder: Path) -> Path:
        ds = _image()
        header = (1).to_bytes(4, "little") + (64).to_bytes(4, "little") + b"\x00" * 56  # 16-bit needs 2
        frame = header + b"\x7f" + b"\x00" * 128
        return _native(folder, "rle-with-too-few-segments", _compressed(ds, RLELossless, frame),
                       syntax=RLELossless)

    @add("implicit-vr-data-sent-as-explicit", StoreStatus.TRANSFER_SYNTAX_MISMATCH)
    def _(folder: Path) -> Path:
        ds = _image()
        return _file(folder, "implicit-vr-data-sent-as-explicit", _body(ds, implicit=True), sop_uid=ds.SOPInstanceUID)

    @add("native-pixels-sent-as-jpeg-2000", StoreStatus.TRANSFER_SYNTAX_MISMATCH)
    def _(folder: Path) -> Path:
        return _native(folder, "native-pixels-sent-as-jpeg-2000", _image(), syntax=JPEG2000Lossless)

    @add("jpeg-2000-pixels-sent-as-explicit-vr", StoreStatus.TRANSFER_SYNTAX_MISMATCH)
    def _(folder: Path) -> Path:
        return _native(folder, "jpeg-2000-pixels-sent-as-explicit-vr", _compressed(_image(), JPEG2000Lossless))

    return cases


@pytest.fixture
def service(tmp_path: Path, pg_url: str) -> Iterator[Service]:
    migrate_to_head(pg_url)
    svc = Service(make_settings(tmp_path / "var", database_url=pg_url), sweep=False, reconcile=False).start()
    try:
        yield svc
    finally:
        svc.stop()


def _send_file(port: int, path: Path) -> tuple[int, str]:
    """One association, one C-STORE of the file's bytes as written: (status, error comment)."""
    syntax = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(MR, [syntax])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="CCFNET")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status), str(rsp.get("ErrorComment", ""))
    finally:
        assoc.release()


def _nothing_stored(svc: Service) -> None:
    assert spool_files(svc.settings.spool_path) == []
    assert svc.sessions is not None
    with svc.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0
        assert session.scalar(select(func.count(Study.id))) == 0


def test_bad_input_table(service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the bytes exactly as written
    cases = bad_inputs()
    assert len(cases) >= 15
    folder = tmp_path / "bad"
    folder.mkdir()
    got = {}
    for case in cases:
        status, comment = _send_file(service.port, case.build(folder))  # one association each
        got[case.name] = (StoreStatus(status).name, comment == StoreStatus(status).comment)
    expected = {case.name: (case.status.name, True) for case in cases}
    assert got == expected
    _nothing_stored(service)
    assert not list((service.settings.spool_path / ".incoming").iterdir())
    # ... and the next association is served normally.
    assert send(service.port, [f.mr_image(*_uids())]) == [0]


def test_the_same_sop_instance_uid_with_other_pixels_is_refused_and_the_first_kept(service: Service) -> None:
    first = _image()
    first.file_meta = FileMetaDataset()
    first.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    again = copy.deepcopy(first)
    assert send(service.port, [first, again]) == [0, 0]  # a plain re-send is fine and counted once
    other = copy.deepcopy(first)
    other.PixelData = bytes(len(first.PixelData))
    moved = copy.deepcopy(first)
    moved.SeriesInstanceUID = generate_uid(f.UID_ROOT)  # same instance UID, another series
    assert send(service.port, [other, moved]) == [StoreStatus.CONFLICTING_DUPLICATE] * 2
    files = spool_files(service.settings.spool_path)
    assert len(files) == 1 and np.array_equal(pydicom.dcmread(files[0]).pixel_array, first.pixel_array)
    assert service.sessions is not None
    with service.sessions() as session:
        assert session.scalars(select(Instance.receive_count)).all() == [2]


def test_rle_lossless_is_accepted_and_stored_as_sent(service: Service) -> None:
    ds = _image()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    original = ds.pixel_array.copy()
    ds.compress(RLELossless)
    assert send(service.port, [ds]) == [0]
    (stored,) = spool_files(service.settings.spool_path)
    read = pydicom.dcmread(stored)
    assert read.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(read.pixel_array, original)


def _uids() -> tuple[str, str]:
    uids = f.new_study()
    return uids.study, uids.series[0]
