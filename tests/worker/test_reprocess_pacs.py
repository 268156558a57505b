"""`ccfnet reprocess --from pacs --accession`: pull a study from a real Orthanc over DICOMweb and over C-GET,
run it on the batch queue, and write new results that supersede the old; --dry-run changes nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from intake_support import make_settings, wait_for
from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port
from sqlalchemy import func, select
from typer.testing import CliRunner

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.cli import app
from worker.db import repository as repo
from worker.db.models import Job
from worker.service import EmbeddedService

pytestmark = [pytest.mark.services, pytest.mark.skipif(ORTHANC is None, reason="Orthanc is not installed")]


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    pacs = Orthanc(tmp_path / "orthanc", free_port(), free_port(), "CCFNET", free_port())
    pacs.folder.mkdir()
    pacs.start()
    yield pacs
    pacs.stop()


def _source(pacs: Orthanc, kind: str) -> dict[str, Any]:
    if kind == "dicomweb":
        return {"kind": "dicomweb", "name": "pacs-web", "url": pacs.dicomweb_url}
    return {"kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1", "port": pacs.dicom_port}


@pytest.mark.parametrize("kind", ["dicomweb", "dicom"])
def test_reprocess_from_pacs_by_accession_supersedes_the_old_results(
    tmp_path: Path, orthanc: Orthanc, kind: str
) -> None:
    datasets, truth = render_study(study_generator(61, 0), 0)
    accession = str(datasets[0].AccessionNumber)
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        orthanc.upload(buffer.getvalue())
    source = _source(orthanc, kind)
    settings = make_settings(tmp_path / "var", port=orthanc.our_port, model_path=MODELS_DIR / PHANTOM_MODEL_NAME,
                             study_quiet_seconds=1.0, reprocess_source=source)
    env = {"CCFNET_DATA_DIR": str(settings.data_dir), "CCFNET_AE_TITLE": settings.ae_title,
           "CCFNET_REPROCESS_SOURCE": json.dumps(source)}
    runner = CliRunner()
    with EmbeddedService(settings) as svc:
        assert svc.sessions is not None

        def jobs() -> list[Job]:
            with svc.sessions() as session:  # type: ignore[misc]
                return list(repo.jobs_for_study(session, truth.study_uid))

        orthanc.send_to_us([orthanc.get("/studies")[0]])  # the live run: Orthanc pushes the study to us
        wait_for(lambda: (j := jobs()) and j[-1].state == "succeeded", timeout=120, interval=0.5)
        (old,) = jobs()

        dry = runner.invoke(app, ["reprocess", "--from", "pacs", "--accession", accession, "--dry-run", "--json"],
                            env=env)
        assert dry.exit_code == 0, dry.output
        assert [s["study"] for s in json.loads(dry.output)["studies"]] == [truth.study_uid]
        assert [j.id for j in jobs()] == [old.id]

        real = runner.invoke(app, ["reprocess", "--from", "pacs", "--accession", accession, "--json"], env=env)
        assert real.exit_code == 0, real.output
        assert f"pulled {truth.study_uid}" in real.output
        wait_for(lambda: len(j := jobs()) == 2 and j[-1].state == "succeeded", timeout=120, interval=0.5)
        first, second = jobs()
        with svc.sessions() as session:
            new_results = repo.result_objects_for_job(session, second.id)
            live_jobs = session.execute(select(func.count()).select_from(Job).where(Job.queue == "inference"))
            assert live_jobs.scalar_one() == 1  # the pulled instances did not also make a live job
    assert second.queue == "batch" and first.superseded_by == second.id
    assert len(new_results) == 3
    missing = runner.invoke(app, ["reprocess", "--from", "pacs", "--accession", "NOPE"], env=env)
    assert missing.exit_code == 1 and "no study" in missing.output
