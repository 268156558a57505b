"""The listener against the real PostgreSQL, with DCMTK and pynetdicom as senders."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import dicom_factory as f
import numpy as np
import pydicom
import pytest
from intake_support import (
    CALLED_AE,
    MR,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    require_dcmtk,
    send,
    spool_files,
    wait_for,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.status import code_to_category
from sqlalchemy import func, select

from worker.db.models import Association, Instance, Study
from worker.listener.status import StoreStatus
from worker.service import Service

pytestmark = pytest.mark.services


@pytest.fixture
def service(tmp_path: Path, pg_url: str) -> Iterator[Service]:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, allowed_calling_aets="MODALITY,STORESCU,ECHOSCU"
    )
    svc = Service(settings, sweep=False, reconcile=False).start()
    try:
        yield svc
    finally:
        svc.stop()


def _instances(svc: Service) -> list[Instance]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def _spool(svc: Service) -> Path:
    return svc.settings.spool_path


def test_pynetdicom_store_is_on_disk_and_in_the_database(service: Service) -> None:
    uids = f.new_study()
    datasets = list(f.study_images(uids, 3))
    assert send(service.port, datasets) == [0, 0, 0]
    rows = _instances(service)
    assert {r.sop_instance_uid for r in rows} == {d.SOPInstanceUID for d in datasets}
    for row, ds in zip(rows, datasets, strict=True):
        path = _spool(service) / row.path
        assert path == _spool(service) / uids.study / uids.series[0] / f"{ds.SOPInstanceUID}.dcm"
        stored = pydicom.dcmread(path)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
        assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY"
        assert row.calling_ae == "MODALITY" and row.peer_address == "127.0.0.1"
        assert row.size_bytes == path.stat().st_size
        assert row.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert not list((_spool(service) / ".incoming").iterdir())
    assert service.sessions is not None

    def association() -> tuple[str, int, str]:
        assert service.sessions is not None
        with service.sessions() as session:
            row = session.scalars(select(Association)).one()
            return row.state, row.instances_stored, row.calling_ae

    wait_for(lambda: association()[0] == "released", timeout=5)
    assert association() == ("released", 3, "MODALITY")


def test_enhanced_mr_and_resend_counts_once(service: Service) -> None:
    uids = f.new_study()
    enhanced = f.enhanced_mr_image(uids.study, uids.series[0])
    assert send(service.port, [enhanced, enhanced]) == [0, 0]
    rows = _instances(service)
    assert len(rows) == 1 and rows[0].receive_count == 2
    assert rows[0].sop_class_uid == f.ENHANCED_MR_IMAGE_STORAGE
    assert len(spool_files(_spool(service) / uids.study)) == 1


def test_dcmtk_echoscu_and_storescu_in_every_transfer_syntax(service: Service, tmp_path: Path) -> None:
    require_dcmtk()
    echo = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", CALLED_AE, "127.0.0.1", str(service.port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert echo.returncode == 0, echo.stderr

    uids = f.new_study()
    source = tmp_path / "src"
    plain = [f.write(f.mr_image(uids.study, uids.series[0], i), source) for i in range(3)]
    eight_bit = f.write(f.mr_image(uids.study, uids.series[0], 3, bits=8), source)
    files: dict[str, Path] = {"explicit": plain[0]}
    conversions = {
        "implicit": (["dcmconv", "+ti"], plain[0]),
        "deflate": (["dcmconv", "+td"], plain[1]),
        "jpeg-baseline": (["dcmcjpeg", "+eb"], eight_bit),
        "jpeg-lossless": (["dcmcjpeg", "+e1"], plain[1]),
        "jpeg-ls": (["dcmcjpls", "+el"], plain[2]),
    }
    for name, (command, src) in conversions.items():
        if shutil.which(command[0]) is None:
            pytest.skip(f"{command[0]} (DCMTK) missing")
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(f.UID_ROOT)
        staged = f.write(ds, tmp_path / "stage", f"{name}-in.dcm")
        out = tmp_path / "conv" / f"{name}.dcm"
        out.parent.mkdir(exist_ok=True)
        subprocess.run([*command, str(staged), str(out)], check=True, capture_output=True, timeout=60)
        files[name] = out
    j2k = f.mr_image(uids.study, uids.series[0], 9)
    j2k.compress(JPEG2000Lossless)
    files["jpeg2000"] = f.write(j2k, tmp_path / "conv", "jpeg2000.dcm")

    # storescu proposes the transfer syntax of the first file per SOP class, so one association per syntax.
    propose = {
        "explicit": "-xe",
        "implicit": "-xi",
        "deflate": "-xd",
        "jpeg-baseline": "-xy",
        "jpeg-lossless": "-xs",
        "jpeg-ls": "-xt",
        "jpeg2000": "-xv",
    }
    for name, path in files.items():
        sent = subprocess.run(
            [
                "storescu",
                propose[name],
                "-aet",
                "STORESCU",
                "-aec",
                CALLED_AE,
                "127.0.0.1",
                str(service.port),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sent.returncode == 0, (name, sent.stderr)
    rows = {r.sop_instance_uid: r for r in _instances(service)}
    expected_syntax = {
        "explicit": "1.2.840.10008.1.2.1",
        "implicit": "1.2.840.10008.1.2",
        "deflate": "1.2.840.10008.1.2.1.99",
        "jpeg-baseline": "1.2.840.10008.1.2.4.50",
        "jpeg-lossless": "1.2.840.10008.1.2.4.70",
        "jpeg-ls": "1.2.840.10008.1.2.4.80",
        "jpeg2000": "1.2.840.10008.1.2.4.90",
    }
    for name, path in files.items():
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        row = rows[sop_uid]
        assert row.transfer_syntax_uid == expected_syntax[name], name
        assert row.calling_ae == "STORESCU"
        stored = pydicom.dcmread(_spool(service) / row.path)
        pixels = stored.pixel_array  # decoders (pylibjpeg / GDCM) are installed: the worker can read it
        assert pixels.shape == (64, 64)
        if name != "jpeg-baseline":
            original = pydicom.dcmread(path).pixel_array
            assert np.array_equal(pixels, original), name


def test_disallowed_calling_ae_and_wrong_called_ae_are_rejected(service: Service) -> None:
    with pytest.raises(ConnectionRefusedError):
        send(service.port, [], calling_ae="INTRUDER")
    with pytest.raises(ConnectionRefusedError):
        send(service.port, [], called_ae="SOMEONEELSE")
    require_dcmtk()
    echo = subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", CALLED_AE, "127.0.0.1", str(service.port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert echo.returncode != 0
    assert "Calling AE Title Not Recognized" in echo.stderr + echo.stdout
    assert service.sessions is not None

    def rejected_rows() -> list[tuple[str, str | None]]:
        assert service.sessions is not None
        with service.sessions() as session:
            return sorted(session.execute(  # type: ignore[arg-type]
                select(Association.calling_ae, Association.reject_reason).where(Association.state == "rejected")
            ).all())

    # The row is written just after the A-ASSOCIATE-RJ goes out (pynetdicom closes the socket as soon as the
    # handler returns, so the reject must be sent first).
    wait_for(lambda: len(rejected_rows()) == 3, timeout=5)
    rejected = rejected_rows()
    assert rejected == [
        ("INTRUDER", "calling_ae_not_recognised"),
        ("INTRUDER", "calling_ae_not_recognised"),
        ("MODALITY", "called_ae_not_recognised"),
    ]


def test_peer_address_allow_list(tmp_path: Path, pg_url: str) -> None:
    migrate_to_head(pg_url)
    settings = make_settings(tmp_path / "var", database_url=pg_url, allowed_peer_addresses="10.0.0.0/8")
    with Service(settings, sweep=False, reconcile=False) as svc, pytest.raises(ConnectionRefusedError):
        send(svc.port, [])
    settings = make_settings(tmp_path / "var", database_url=pg_url, allowed_peer_addresses="127.0.0.0/8,::1")
    with Service(settings, sweep=False, reconcile=False) as svc:
        assert send(svc.port, [f.mr_image(*_one_study())]) == [0]


def _one_study() -> tuple[str, str]:
    uids = f.new_study()
    return uids.study, uids.series[0]


def test_concurrent_associations(service: Service) -> None:
    uids = f.new_study(series_count=4)
    results: dict[int, list[int]] = {}

    def worker(n: int) -> None:
        results[n] = send(service.port, [f.mr_image(uids.study, uids.series[n], i) for i in range(10)])

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(results[n] == [0] * 10 for n in range(4))
    assert len(_instances(service)) == 40


def test_low_disk_is_out_of_resources(tmp_path: Path, pg_url: str) -> None:
    migrate_to_head(pg_url)
    settings = make_settings(tmp_path / "var", database_url=pg_url, min_free_disk_mb=10**9)
    with Service(settings, sweep=False, reconcile=False) as svc:
        assert send(svc.port, [f.mr_image(*_one_study())]) == [StoreStatus.OUT_OF_RESOURCES]
        assert spool_files(svc.settings.spool_path) == []
        assert _instances(svc) == []


# Malformed input --------------------------------------------------------------------------------------------
def _raw_file(path: Path, meta_sop_class: str, meta_sop_uid: str, body: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_sop_class
    meta.MediaStorageSOPInstanceUID = meta_sop_uid
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1234.1"
    from pynetdicom.dsutils import encode_file_meta

    path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body)
    return path


def _encoded(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _malformed(
    ds: Dataset, folder: Path, name: str, *, affected: str | None = None, body: bytes | None = None
) -> Path:
    meta_uid = affected if affected is not None else str(ds.get("SOPInstanceUID") or generate_uid(f.UID_ROOT))
    return _raw_file(folder / f"{name}.dcm", MR, meta_uid, body if body is not None else _encoded(ds))


def malformed_cases(folder: Path) -> dict[str, Path]:
    """At least ten ways a dataset can be wrong; each must get a failure status and leave nothing behind."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = _one_study()

    def base() -> Dataset:
        ds = f.mr_image(study, series, 0)
        del ds.file_meta
        return ds

    cases: dict[str, Path] = {}

    def without(keyword: str) -> None:
        ds = base()
        delattr(ds, keyword)
        cases[f"missing-{keyword}"] = _malformed(ds, folder, f"missing-{keyword}")

    without("SOPInstanceUID")
    without("StudyInstanceUID")
    without("SeriesInstanceUID")

    def with_uid(name: str, keyword: str, value: str) -> None:
        ds = base()
        setattr(ds, keyword, value)
        cases[name] = _malformed(ds, folder, name)

    with_uid("study-uid-path-traversal", "StudyInstanceUID", "../../../etc")
    with_uid("series-uid-with-slash", "SeriesInstanceUID", "1.2/3.4")
    with_uid("sop-uid-letters", "SOPInstanceUID", "1.2.abc.4")
    with_uid("study-uid-too-long", "StudyInstanceUID", "1." + "2" * 70)
    with_uid("series-uid-leading-zero", "SeriesInstanceUID", "1.02.3")
    with_uid("study-uid-empty", "StudyInstanceUID", "")
    with_uid("sop-uid-trailing-dot", "SOPInstanceUID", "1.2.3.")

    ds = base()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage sent as MR
    cases["sop-class-mismatch"] = _malformed(ds, folder, "sop-class-mismatch")
    ds = base()
    cases["sop-instance-differs-from-request"] = _malformed(
        ds, folder, "sop-instance-differs-from-request", affected=generate_uid(f.UID_ROOT)
    )
    whole = base()
    good = _encoded(whole)
    cases["truncated"] = _malformed(whole, folder, "truncated", body=good[: len(good) // 3 + 5])
    compressed = base()
    compressed.file_meta = FileMetaDataset()
    compressed.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    compressed.compress(JPEG2000Lossless)
    del compressed.file_meta
    body = _encoded(compressed)
    for name, cut in (("j2k-cut-in-fragment", 3), ("j2k-cut-before-delimiter", 8), ("j2k-cut-early", 200)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR
        meta.MediaStorageSOPInstanceUID = compressed.SOPInstanceUID
        meta.TransferSyntaxUID = JPEG2000Lossless
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1234.1"
        from pynetdicom.dsutils import encode_file_meta

        path = folder / f"{name}.dcm"
        path.write_bytes(b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body[: len(body) - cut])
        cases[name] = path
    cases["garbage"] = _malformed(base(), folder, "garbage", body=bytes(range(256)) * 8)
    cases["length-overflow"] = _malformed(
        base(), folder, "length-overflow", body=b"\x08\x00\x16\x00UI\xff\x7f" + b"1.2.3\x00"
    )
    return cases


def test_malformed_datasets_get_failures_and_leave_nothing(
    service: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes exactly as written
    cases = malformed_cases(tmp_path / "bad")
    assert len(cases) >= 10
    statuses: dict[str, int] = {}
    for name, path in cases.items():
        (status,) = send(service.port, [path])  # one association each: the listener must keep serving
        statuses[name] = status
    not_failed = {n: hex(s) for n, s in statuses.items() if code_to_category(s) != "Failure"}
    assert not not_failed, not_failed
    assert statuses["sop-class-mismatch"] == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert statuses["study-uid-path-traversal"] == StoreStatus.INVALID_UID
    assert statuses["truncated"] == StoreStatus.DATASET_DECODE_FAILED
    assert spool_files(_spool(service)) == []
    assert _instances(service) == []
    assert service.sessions is not None
    with service.sessions() as session:
        assert session.scalar(select(func.count(Study.id))) == 0
    # ... and the next association is served normally
    assert send(service.port, [f.mr_image(*_one_study())]) == [0]
    assert len(_instances(service)) == 1


def test_spool_prepare_removes_temp_files_of_a_crash(tmp_path: Path) -> None:
    from worker.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    (spool.incoming / "abc.tmp").write_bytes(b"half")
    assert spool.prepare() == 1
    assert list(spool.incoming.iterdir()) == []


def test_echo_with_pynetdicom(service: Service) -> None:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", service.port, ae_title=CALLED_AE)
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
