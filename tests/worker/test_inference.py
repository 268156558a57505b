"""The inference processor end to end: DICOM in through the listener, findings and result objects out."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from intake_support import (
    RedisSpace,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    redis_space,  # noqa: F401  (fixture)
    send,
    spool_files,
    wait_for,
)

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.db import repository as repo
from worker.service import EmbeddedService, EmbeddedWorker, Service

pytestmark = pytest.mark.services
MODEL = MODELS_DIR / PHANTOM_MODEL_NAME
TERMINAL = {"succeeded", "failed", "no_eligible_series", "not_analysed", "superseded"}


def _study(seed: int) -> tuple[list[pydicom.Dataset], Any]:
    return render_study(study_generator(seed, 0), 0)


def _final_job(svc: Service, study_uid: str, timeout: float = 120) -> Any:
    assert svc.sessions is not None

    def done() -> Any:
        with svc.sessions() as session:  # type: ignore[misc]
            jobs = list(repo.jobs_for_study(session, study_uid))
            return jobs[-1] if jobs and jobs[-1].state in TERMINAL else None

    return wait_for(done, timeout=timeout, interval=0.3)


def test_phantom_study_gives_11_findings_and_result_objects_on_postgres(
    tmp_path: Path, pg_url: str, redis_space: RedisSpace
) -> None:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, broker_url=redis_space.url,
        redis_key_prefix=redis_space.prefix, model_path=MODEL,
    )
    datasets, truth = _study(21)
    with Service(settings, reconcile=False) as svc:
        assert svc.celery is not None and svc.sessions is not None
        worker = EmbeddedWorker(svc.celery, queues=("inference",), concurrency=1)
        worker.start()
        try:
            assert set(send(svc.port, datasets)) == {0}
            job = _final_job(svc, truth.study_uid)
        finally:
            worker.stop()
        assert job.state == "succeeded", job.error
        with svc.sessions() as session:
            findings = list(repo.findings_for_job(session, job.id))
            objects = list(repo.result_objects_for_job(session, job.id))
            events = [e.kind for e in repo.job_events(session, job.id)]
    assert [f.structure for f in findings] == [
        "L1", "L2", "L3", "L4", "L5", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"
    ]
    assert all(f.source_sop_instance_uid == truth.instance_uid for f in findings)
    assert all(f.patient_x_mm is not None for f in findings)
    # The sagittal slice's patient x is the slice position: every finding lies in that plane.
    assert len({round(f.patient_x_mm, 3) for f in findings}) == 1
    assert "results_written" in events
    assert sorted(o.kind for o in objects) == ["gsps", "sc", "sr"]
    for obj in objects:
        ds = pydicom.dcmread(settings.data_dir / "results" / obj.path)
        assert ds.StudyInstanceUID == truth.study_uid and ds.SOPInstanceUID == obj.sop_instance_uid
    points = np.array([[f.column_px - 0.5, f.row_px - 0.5] for f in findings])
    spacing = np.array(truth.pixel_spacing_mm[::-1])
    within = (np.linalg.norm((points - truth.points) * spacing, axis=1) <= 6.0).mean()
    print(f"phantom model on a new phantom through the service: {within:.0%} within 6 mm")
    assert within >= 0.5


def _embedded(tmp_path: Path, **overrides: Any) -> EmbeddedService:
    options: dict[str, Any] = {"model_path": MODEL, "study_quiet_seconds": 1.0, **overrides}
    return EmbeddedService(make_settings(tmp_path / "var", **options))


def test_a_study_without_a_sagittal_series_ends_with_a_reason(tmp_path: Path) -> None:
    datasets, truth = _study(22)
    axial = [ds for ds in datasets if "TRA" in str(ds.SeriesDescription)]
    assert axial
    with _embedded(tmp_path) as svc:
        assert set(send(svc.port, axial)) == {0}
        job = _final_job(svc, truth.study_uid)
    assert job.state == "no_eligible_series"
    assert "no sagittal series" in job.error and "axial" in job.error


def test_a_one_slice_sagittal_study_is_analysed_with_its_edges_repeated(tmp_path: Path) -> None:
    datasets, truth = _study(23)
    only = [ds for ds in datasets if ds.SOPInstanceUID == truth.instance_uid]
    with _embedded(tmp_path, include_segmentation=True) as svc:
        assert send(svc.port, only) == [0]
        job = _final_job(svc, truth.study_uid)
        assert svc.sessions is not None
        with svc.sessions() as session:
            assert len(repo.findings_for_job(session, job.id)) == 11
            objects = {o.kind: o for o in repo.result_objects_for_job(session, job.id)}
    assert job.state == "succeeded", job.error
    assert sorted(objects) == ["gsps", "sc", "seg", "sr"]  # the optional segmentation, when set
    seg = pydicom.dcmread(svc.settings.data_dir / "results" / objects["seg"].path)
    assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == 11  # binary by default
    sr = pydicom.dcmread(svc.settings.data_dir / "results" / objects["sr"].path)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"  # the measurement report


def test_a_spool_file_damaged_after_storage_fails_the_job_with_its_reason(tmp_path: Path) -> None:
    datasets, truth = _study(24)
    sagittal_t2 = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    with _embedded(tmp_path) as svc:
        assert set(send(svc.port, sagittal_t2)) == {0}
        for path in spool_files(svc.settings.spool_path):
            path.write_bytes(b"not DICOM at all")
        job = _final_job(svc, truth.study_uid)
    assert job.state == "failed"
    assert job.error.startswith("unreadable input")


def test_a_pair_checkpoint_runs_through_the_worker_and_is_named_in_its_results(tmp_path: Path) -> None:
    """A pair (ccfnet_core.pair) is a checkpoint like any other: the worker loads it and the results name it."""
    from ccfnet_core.pair import assemble_pair

    pair = assemble_pair(MODEL, MODEL, tmp_path / "pair.pt")
    datasets, truth = _study(25)
    with _embedded(tmp_path, model_path=tmp_path / "pair.pt") as svc:
        assert set(send(svc.port, datasets)) == {0}
        job = _final_job(svc, truth.study_uid)
        assert svc.sessions is not None
        with svc.sessions() as session:
            findings = list(repo.findings_for_job(session, job.id))
            objects = {o.kind: o for o in repo.result_objects_for_job(session, job.id)}
    assert job.state == "succeeded", job.error
    assert len(findings) == 11
    sr = pydicom.dcmread(svc.settings.data_dir / "results" / objects["sr"].path)
    assert sr.ManufacturerModelName == "CCF-Net R18-MSC-PAIR" and pair.arch == "r18-msc-pair"


def _sr_algorithm_items(items: Any) -> list[tuple[str, str]]:
    """(concept meaning, value) of every TID 4019 algorithm name/version/parameter item, at any depth."""
    found: list[tuple[str, str]] = []
    for item in items:
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if meaning in {"Algorithm Name", "Algorithm Version", "Algorithm Parameters"}:
            found.append((meaning, str(item.TextValue)))
        if "ContentSequence" in item:
            found.extend(_sr_algorithm_items(item.ContentSequence))
    return found


def test_every_result_object_names_the_checkpoint_that_ran_by_its_card_and_sha256(tmp_path: Path) -> None:
    """The phantom checkpoint through the service: SR, SEG, PR and SC each name the card's model name, version
    and the weights' sha256, read from the file (no setting names the model)."""
    from ccfnet_core.checkpoint import read_card

    card = read_card(MODEL)
    version = f"{card.version}@{card.weights_sha256[:12]}"
    datasets, truth = _study(26)
    with _embedded(tmp_path, include_segmentation=True) as svc:
        assert set(send(svc.port, datasets)) == {0}
        job = _final_job(svc, truth.study_uid)
        assert svc.sessions is not None
        with svc.sessions() as session:
            objects = {o.kind: o for o in repo.result_objects_for_job(session, job.id)}
    assert job.state == "succeeded", job.error
    assert job.model_version == version
    assert sorted(objects) == ["gsps", "sc", "seg", "sr"]
    read = {kind: pydicom.dcmread(svc.settings.data_dir / "results" / row.path) for kind, row in objects.items()}
    for kind, ds in read.items():
        assert ds.ManufacturerModelName == card.display_name, kind
        assert list(ds.SoftwareVersions)[1] == version, kind
        (equipment,) = [item for item in ds.ContributingEquipmentSequence if "DeviceUID" in item]
        assert equipment.DeviceUID == card.device_uid, kind
        assert equipment.ManufacturerModelName == card.display_name, kind
        assert f"weights sha256 {card.weights_sha256}" in equipment.ContributionDescription, kind
    assert f"weights sha256 {card.weights_sha256}" in read["sc"].ImageComments
    algorithm = set(_sr_algorithm_items(read["sr"].ContentSequence))
    assert algorithm == {("Algorithm Name", card.display_name), ("Algorithm Version", version),
                         ("Algorithm Parameters", f"weights sha256 {card.weights_sha256}")}
    for segment in read["seg"].SegmentSequence:
        (identification,) = segment.SegmentationAlgorithmIdentificationSequence
        assert (identification.AlgorithmName, identification.AlgorithmVersion) == (card.display_name, version)
        assert identification.AlgorithmParameters == f"weights sha256={card.weights_sha256}"


def _measurement_groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    (measurements,) = [item for item in sr.ContentSequence
                       if item.ConceptNameCodeSequence[0].CodeValue == "126010"]  # Imaging Measurements
    return list(measurements.ContentSequence)


def _item(group: pydicom.Dataset, code_value: str) -> pydicom.Dataset:
    (item,) = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == code_value]
    return item


def test_the_sr_states_each_grade_word_its_calibrated_percentage_and_its_code(tmp_path: Path) -> None:
    """The shipped model through the service (issue 26): each SR group's label says the grade in words with the
    calibrated percentage, the coded finding is that grade's code, and abnormal means at or above the card's
    operating point for the structure's kind, not 0.5."""
    from ccfnet_core.checkpoint import default_model_path, read_card
    from ccfnet_core.readout import Readout
    from ccfnet_core.structures import StructureType
    from worker.results import codes
    from worker.results.findings import LABEL_NAMES

    model = default_model_path()
    readout = Readout.from_dict(read_card(model).readout)
    datasets, truth = _study(27)
    with _embedded(tmp_path, model_path=model) as svc:
        assert set(send(svc.port, datasets)) == {0}
        job = _final_job(svc, truth.study_uid)
        assert svc.sessions is not None
        with svc.sessions() as session:
            rows = {f.structure: f for f in repo.findings_for_job(session, job.id)}
            objects = {o.kind: o for o in repo.result_objects_for_job(session, job.id)}
    assert job.state == "succeeded", job.error
    sr = pydicom.dcmread(svc.settings.data_dir / "results" / objects["sr"].path)
    groups = _measurement_groups(sr)
    assert len(groups) == 11
    for group in groups:
        site = _item(group, "363698007").ConceptCodeSequence[0].CodeValue
        (name,) = [n for n, code in codes.STRUCTURE_SITES.items() if code.value == site]
        row = rows[name]
        word = row.diagnosis
        (label,) = [key for key, text in LABEL_NAMES[row.kind].items() if text == word]
        stated = row.probability if label != "v1" else 1.0 - row.probability
        assert _item(group, codes.COMMENT.value).TextValue == f"{name} {row.kind}: {word}, {round(100 * stated)} %"
        coded = _item(group, "121071").ConceptCodeSequence[0]
        expected = codes.DIAGNOSES[(row.kind, label)]
        assert (coded.CodeValue, coded.CodingSchemeDesignator) == (expected.value, expected.scheme_designator)
        probability = _item(group, codes.PROBABILITY_OF_ABNORMALITY.value).MeasuredValueSequence[0]
        assert float(probability.NumericValue) == pytest.approx(100 * row.probability, abs=0.051)
        assert (label != "v1") == (row.probability >= readout.threshold(StructureType(row.kind))), name
