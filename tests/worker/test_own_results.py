"""Our own result objects sent back to the listener are acknowledged and never become a job (issue 23, item 5).

The signature is checked on the objects the writers really build; the listener is the real SCP on the real
PostgreSQL, accepting MR plus the result classes through CCFNET_EXTRA_STORAGE_SOP_CLASSES only.
"""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import results_fixtures as rf
from intake_support import (
    MR,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    send,
    spool_files,
)
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from worker import assembly
from worker.db import repository as repo
from worker.db.models import Instance, ResultObject, Study, StudyState
from worker.provenance import MANUFACTURER, RESULT_KINDS, own_output
from worker.results import build_results, codes
from worker.service import Service
from worker.timeutil import utcnow

_CLASS_OF_KIND = {kind: uid for uid, kind in RESULT_KINDS.items()}
RESULT_CONTEXTS = tuple(_CLASS_OF_KIND[kind] for kind in ("sr", "gsps", "sc", "seg"))  # in build_results' order
OTHER_DEVICE_UID = "2.25.99887766554433221100"


def _ours(source: Dataset | None = None, *, phantom_only: bool = False) -> list[Dataset]:
    """SR, GSPS, key image and SEG as the writers build them."""
    result = rf.make_result(source=source, phantom_only=phantom_only)
    return build_results(result, include_segmentation=True)


def _other_vendor(ds: Dataset) -> Dataset:
    """The same kind of object made by another AI vendor: its own maker, model and device UID, new UIDs."""
    other = copy.deepcopy(ds)
    other.SOPInstanceUID = generate_uid()
    other.file_meta.MediaStorageSOPInstanceUID = other.SOPInstanceUID
    other.SeriesInstanceUID = generate_uid()
    other.Manufacturer = "Other AI Inc"
    for item in other.ContributingEquipmentSequence:
        if item.Manufacturer == MANUFACTURER:
            item.Manufacturer = "Other AI Inc"
            item.DeviceUID = OTHER_DEVICE_UID
    return other


def _derived(ds: Dataset) -> Dataset:
    """Another application's object derived from ours: it keeps our Contributing Equipment item (as IHE asks)
    but names its own maker at the top."""
    derived = copy.deepcopy(ds)
    derived.SOPInstanceUID = generate_uid()
    derived.file_meta.MediaStorageSOPInstanceUID = derived.SOPInstanceUID
    derived.Manufacturer = "Viewer Corp"
    return derived


# The signature, on the objects the writers build ---------------------------------------------------------
@pytest.mark.parametrize("phantom_only", [False, True])
def test_every_object_we_write_carries_our_signature(phantom_only: bool) -> None:
    objects = _ours(phantom_only=phantom_only)
    assert [str(ds.SOPClassUID) for ds in objects] == list(RESULT_CONTEXTS)  # RESULT_KINDS covers what we write
    for ds in objects:
        found = own_output(ds)
        assert found is not None, ds.SOPClassUID
        assert found.device_uid == rf.make_algorithm().device_uid
    assert (codes.PROCESSING_EQUIPMENT.value, codes.PROCESSING_EQUIPMENT.scheme_designator) == ("109102", "DCM")


def test_source_images_and_other_vendors_objects_are_not_ours() -> None:
    objects = _ours()
    assert own_output(rf.make_source()) is None
    for ds in objects:
        assert own_output(_other_vendor(ds)) is None
        assert own_output(_derived(ds)) is None
    no_device = copy.deepcopy(objects[0])
    for item in no_device.ContributingEquipmentSequence:
        if "DeviceUID" in item:
            del item.DeviceUID
    assert own_output(no_device) is None
    assert own_output(Dataset()) is None


# The listener --------------------------------------------------------------------------------------------
@pytest.fixture
def service(tmp_path: Path, pg_url: str) -> Iterator[Service]:
    migrate_to_head(pg_url)
    settings = make_settings(tmp_path / "var", database_url=pg_url, extra_storage_sop_classes=",".join(RESULT_CONTEXTS))
    svc = Service(settings, sweep=False, reconcile=False).start()
    try:
        yield svc
    finally:
        svc.stop()


def _sweep(svc: Service) -> list[assembly.NewJob]:
    """Assemble every study, as if its quiet period were long over."""
    assert svc.sessions is not None
    later = utcnow() + dt.timedelta(hours=1)
    return assembly.sweep_once(svc.sessions, quiet_seconds=0, model_version="m1", now=later)


def _send(svc: Service, datasets: list[Dataset]) -> list[int]:
    return send(svc.port, datasets, calling_ae="PACS", contexts=(MR, *RESULT_CONTEXTS))


def _late_mr(source: Dataset) -> Dataset:
    late = copy.deepcopy(source)
    late.SOPInstanceUID = generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.InstanceNumber = int(source.InstanceNumber) + 1
    return late


def _analysed_study(svc: Service) -> tuple[Dataset, int, list[Dataset]]:
    """An MR image stored and assembled into a job, and that job's result objects recorded as it writes them."""
    source = rf.make_source()
    assert _send(svc, [source]) == [0]
    (job,) = _sweep(svc)
    objects = _ours(source)
    assert svc.sessions is not None
    with svc.sessions.begin() as session:
        for ds in objects:
            repo.add_result_object(session, ResultObject(
                job_id=job.job_id, kind=RESULT_KINDS[str(ds.SOPClassUID)], sop_class_uid=str(ds.SOPClassUID),
                sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                path=f"{job.job_id}/{ds.SOPInstanceUID}.dcm", size_bytes=1, created_at=utcnow(),
            ))
    return source, job.job_id, objects


def _study(svc: Service, study_uid: str) -> tuple[str, list[str]]:
    """The study's state and the SOP Instance UIDs recorded for it."""
    assert svc.sessions is not None
    with svc.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        uids = session.scalars(select(Instance.sop_instance_uid).where(Instance.study_id == study.id)).all()
        return study.state, sorted(uids)


def _returned_events(svc: Service, job_id: int) -> list[dict[str, str]]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        return [dict(e.detail or {}) for e in repo.job_events(session, job_id) if e.kind == "result_returned"]


def test_our_results_sent_back_are_acknowledged_and_never_make_a_job(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    source, job_id, objects = _analysed_study(service)
    study_uid = str(source.StudyInstanceUID)
    caplog.set_level(logging.INFO, logger="worker.listener")

    assert _send(service, objects) == [0, 0, 0, 0]  # Success: the PACS's routing rule is done with them

    assert _study(service, study_uid) == (StudyState.ASSEMBLED.value, [str(source.SOPInstanceUID)])
    assert _sweep(service) == []
    assert service.sessions is not None
    with service.sessions() as session:
        assert [j.id for j in repo.jobs_for_study(session, study_uid)] == [job_id]
    assert [f.name for f in spool_files(service.settings.spool_path / study_uid)] == [f"{source.SOPInstanceUID}.dcm"]
    events = _returned_events(service, job_id)
    assert [e["sop_instance_uid"] for e in events] == [str(ds.SOPInstanceUID) for ds in objects]
    assert {(e["calling_ae"], e["recognised_by"]) for e in events} == {("PACS", "equipment")}
    logged = [r.getMessage() for r in caplog.records if "acknowledged, not analysed" in r.getMessage()]
    assert len(logged) == 4
    assert all(f"job {job_id}" in line and "'PACS'" in line for line in logged)
    assert "Doe^Jane" not in caplog.text and "PAT-0001" not in caplog.text


def test_ours_from_elsewhere_and_ours_by_uid_only_are_acknowledged(service: Service) -> None:
    """Made by another installation of the service (not in this database): its signature is enough. Recorded
    here but with the equipment attributes changed on the way: its SOP Instance UID is enough."""
    source, job_id, objects = _analysed_study(service)
    study_uid = str(source.StudyInstanceUID)
    elsewhere = _ours(_late_mr(source))  # same study, objects this database never recorded
    coerced = copy.deepcopy(objects[0])
    coerced.Manufacturer = "PACS Corp"

    assert _send(service, [*elsewhere, coerced]) == [0] * 5

    assert _study(service, study_uid) == (StudyState.ASSEMBLED.value, [str(source.SOPInstanceUID)])
    assert _sweep(service) == []
    assert [(e["sop_instance_uid"], e["recognised_by"]) for e in _returned_events(service, job_id)] == [
        (str(coerced.SOPInstanceUID), "sop_instance_uid")
    ]


def test_other_vendors_objects_and_a_late_mr_image_are_ordinary_instances(service: Service) -> None:
    source, job_id, objects = _analysed_study(service)
    study_uid = str(source.StudyInstanceUID)
    late = _late_mr(source)
    others = [_other_vendor(objects[0]), _derived(objects[2])]

    assert _send(service, [late, *others]) == [0, 0, 0]

    state, uids = _study(service, study_uid)
    assert state == StudyState.RECEIVING.value
    assert uids == sorted(str(ds.SOPInstanceUID) for ds in [source, late, *others])
    (job,) = _sweep(service)
    assert job.superseded == (job_id,)
    assert _returned_events(service, job_id) == []
