"""Results back to a real PACS: Orthanc sends us a study, our SR / GSPS / key image land in it once, by
C-STORE and by STOW-RS; exports survive Orthanc being down, go dead past the bound, and `retry-exports`
delivers them without duplicates."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pydicom
import pytest
from intake_support import CALLED_AE, make_settings, send, wait_for
from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port
from typer.testing import CliRunner

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.cli import app
from worker.db import repository as repo
from worker.service import EmbeddedService

pytestmark = [pytest.mark.services, pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed")]
MODEL = MODELS_DIR / PHANTOM_MODEL_NAME


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port(), CALLED_AE, free_port())
    pacs.folder.mkdir()
    pacs.start()
    yield pacs
    pacs.stop()


def _destination(pacs: Orthanc, kind: str) -> dict[str, Any]:
    if kind == "dicom":
        return {"kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                "port": pacs.dicom_port}
    return {"kind": "dicomweb", "name": "pacs-web", "url": pacs.dicomweb_url}


def _settings(tmp_path: Path, pacs: Orthanc, kind: str, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "port": pacs.our_port, "model_path": MODEL, "study_quiet_seconds": 1.0,
        "destinations": [_destination(pacs, kind)], "export_backoff_seconds": 0.3,
        "reconcile_grace_seconds": 1.0, "reconcile_interval_seconds": 0.5,
    }
    values.update(overrides)
    return make_settings(tmp_path / "var", **values)


def _phantom(seed: int) -> tuple[list[pydicom.Dataset], Any]:
    return render_study(study_generator(seed, 0), 0)


def _exports(svc: EmbeddedService, study_uid: str) -> list[Any]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        jobs = list(repo.jobs_for_study(session, study_uid))
        return [e for job in jobs for e in repo.exports_for_job(session, job.id)]


def _result_uids(svc: EmbeddedService, study_uid: str) -> list[str]:
    assert svc.sessions is not None
    with svc.sessions() as session:
        jobs = list(repo.jobs_for_study(session, study_uid))
        return [o.sop_instance_uid for job in jobs for o in repo.result_objects_for_job(session, job.id)]


def _delivered(svc: EmbeddedService, study_uid: str, count: int = 3) -> bool:
    exports = _exports(svc, study_uid)
    return len(exports) == count and all(e.state == "delivered" for e in exports)


@pytest.mark.parametrize("kind", ["dicom", "dicomweb"])
def test_orthanc_sends_a_study_and_gets_sr_gsps_and_key_image_back_once(
    tmp_path: Path, orthanc: Orthanc, kind: str
) -> None:
    datasets, truth = _phantom(31)
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        orthanc.upload(buffer.getvalue())
    study_id = orthanc.get("/studies")[0]
    with EmbeddedService(_settings(tmp_path, orthanc, kind)) as svc:
        orthanc.send_to_us([study_id])  # Orthanc is the sending peer (C-STORE SCU) to our listener
        wait_for(lambda: _delivered(svc, truth.study_uid), timeout=180, interval=0.5)
        results = _result_uids(svc, truth.study_uid)
    in_pacs = orthanc.sop_instance_uids(truth.study_uid)
    assert len(in_pacs) == len(datasets) + 3
    assert all(in_pacs.count(uid) == 1 for uid in results)
    modalities = {s["MainDicomTags"].get("Modality") for s in orthanc.get(f"/studies/{study_id}/series")}
    assert {"MR", "SR", "PR"} <= modalities


def test_exports_wait_for_orthanc_and_land_once_when_it_is_back(tmp_path: Path, orthanc: Orthanc) -> None:
    datasets, truth = _phantom(32)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    orthanc.stop()
    with EmbeddedService(_settings(tmp_path, orthanc, "dicom", export_max_attempts=20)) as svc:
        assert set(send(svc.port, sagittal)) == {0}
        wait_for(lambda: any(e.attempts >= 1 and e.last_error for e in _exports(svc, truth.study_uid)),
                 timeout=180, interval=0.5)
        orthanc.start()
        wait_for(lambda: _delivered(svc, truth.study_uid), timeout=120, interval=0.5)
        results = _result_uids(svc, truth.study_uid)
    in_pacs = orthanc.sop_instance_uids(truth.study_uid)
    assert sorted(in_pacs) == sorted(results)  # only our 3 objects (the study came by our own sender)


def test_past_the_bound_exports_are_dead_and_retry_exports_delivers_them_without_duplicates(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    datasets, truth = _phantom(33)
    sagittal = [ds for ds in datasets if ds.SeriesInstanceUID == truth.series_uid]
    orthanc.stop()
    settings = _settings(tmp_path, orthanc, "dicom", export_max_attempts=2, export_backoff_seconds=0.2)
    with EmbeddedService(settings) as svc:
        assert set(send(svc.port, sagittal)) == {0}
        wait_for(lambda: (e := _exports(svc, truth.study_uid)) and len(e) == 3
                 and all(x.state == "dead" for x in e), timeout=180, interval=0.5)
        assert all(x.attempts == 2 for x in _exports(svc, truth.study_uid))
    orthanc.start()
    env = {
        "CCFNET_DATA_DIR": str(settings.data_dir),
        "CCFNET_AE_TITLE": settings.ae_title,
        "CCFNET_DESTINATIONS": json.dumps([_destination(orthanc, "dicom")]),
    }
    runner = CliRunner()
    first = runner.invoke(app, ["retry-exports", "--all-dead", "--json"], env=env)
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert report["revived"] == 3 and {r["state"] for r in report["results"]} == {"delivered"}
    second = runner.invoke(app, ["retry-exports", "--all-dead", "--json"], env=env)
    assert second.exit_code == 0 and json.loads(second.output)["revived"] == 0
    in_pacs = orthanc.sop_instance_uids(truth.study_uid)
    assert len(in_pacs) == 3 and len(set(in_pacs)) == 3
