"""An RLE Lossless study goes through intake, inference and the result objects (issue 24, Done-when 4)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from intake_support import make_settings, send, spool_files, wait_for
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
from ccfnet_core.phantom import render_study, study_generator
from worker.db import repository as repo
from worker.service import EmbeddedService

pytestmark = pytest.mark.services
TERMINAL = {"succeeded", "failed", "no_eligible_series", "not_analysed", "superseded"}


def test_an_rle_lossless_study_is_analysed_and_gets_its_results(tmp_path: Path) -> None:
    datasets, truth = render_study(study_generator(25, 0), 0)
    sent = []
    for ds in datasets:
        if ds.SOPInstanceUID != truth.instance_uid:
            continue
        rle = copy.deepcopy(ds)
        rle.file_meta = getattr(rle, "file_meta", None) or FileMetaDataset()
        rle.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        rle.compress(RLELossless)
        sent.append(rle)
    assert len(sent) == 1
    settings = make_settings(tmp_path / "var", model_path=MODELS_DIR / PHANTOM_MODEL_NAME, study_quiet_seconds=1.0)
    with EmbeddedService(settings) as svc:
        assert send(svc.port, sent) == [0]
        (stored,) = spool_files(svc.settings.spool_path)
        assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == RLELossless  # stored as received
        assert svc.sessions is not None

        def finished() -> Any:
            assert svc.sessions is not None
            with svc.sessions() as session:
                jobs = list(repo.jobs_for_study(session, truth.study_uid))
                return jobs[-1] if jobs and jobs[-1].state in TERMINAL else None

        job = wait_for(finished, timeout=120, interval=0.3)
        with svc.sessions() as session:
            findings = list(repo.findings_for_job(session, job.id))
            objects = list(repo.result_objects_for_job(session, job.id))
    assert job.state == "succeeded", job.error
    assert len(findings) == 11
    assert sorted(o.kind for o in objects) == ["gsps", "sc", "sr"]
    sr = pydicom.dcmread(settings.data_dir / "results" / next(o for o in objects if o.kind == "sr").path)
    assert sr.StudyInstanceUID == truth.study_uid
    decoded = pydicom.dcmread(stored).pixel_array
    original = next(ds for ds in datasets if ds.SOPInstanceUID == truth.instance_uid).pixel_array
    assert np.array_equal(decoded, original)
