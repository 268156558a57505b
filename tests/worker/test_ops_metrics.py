"""/metrics against the real PostgreSQL and Redis: the counters move as instances arrive through the DICOM
listener, the database gauges equal the database, and counters from several processes are summed when
PROMETHEUS_MULTIPROC_DIR is set."""

# ruff: noqa: F811  (pytest fixtures imported from intake_support are parameters of the same name)
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dicom_factory as f
import httpx
import pytest
from intake_support import (
    RedisSpace,
    make_settings,
    migrate_to_head,
    pg_url,  # noqa: F401  (fixture)
    redis_space,  # noqa: F401  (fixture)
    send,
)
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE

from worker.db import repository as repo
from worker.queue.processing import record_pickup_only
from worker.service import Service
from worker.timeutil import utcnow

pytestmark = pytest.mark.services
REPO = Path(__file__).resolve().parents[2]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def test_metrics_scraped_before_and_after_intake_show_the_counters_moving(
    tmp_path: Path, pg_url: str, redis_space: RedisSpace
) -> None:
    migrate_to_head(pg_url)
    settings = make_settings(
        tmp_path / "var", database_url=pg_url, broker_url=redis_space.url, redis_key_prefix=redis_space.prefix,
        study_quiet_seconds=600, http_port=0, ops_token="s3cret",
    )
    with Service(settings, processor=record_pickup_only, reconcile=False) as svc:
        before = scrape(svc.http_port)  # no token needed for /metrics
        uids = f.new_study()
        assert send(svc.port, f.study_images(uids, 3)) == [0, 0, 0]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(f.MR_IMAGE_STORAGE)
        refused = ae.associate("127.0.0.1", svc.port, ae_title="SOMEONE_ELSE")
        assert refused.is_rejected
        assert svc.sessions is not None
        with svc.sessions.begin() as session:
            repo.set_queue_paused(session, "batch", paused=True, now=utcnow())
        after = scrape(svc.http_port)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("ccfnet_instances_received_total") == 3
    assert moved("ccfnet_associations_total", outcome="accepted", reason="") == 1
    assert moved("ccfnet_associations_total", outcome="rejected", reason="called_ae_not_recognised") == 1
    # The gauges are read from the database at scrape time.
    assert before[("ccfnet_studies_waiting", ())] == 0
    assert after[("ccfnet_studies_waiting", ())] == 1
    assert after[("ccfnet_database_up", ())] == 1
    assert ("ccfnet_inference_seconds_count", ()) in after
    paused = {queue: after[("ccfnet_queue_paused", (("queue", queue),))] for queue in ("inference", "batch")}
    assert paused == {"inference": 0, "batch": 1}


_CHILD = """
import sys
from worker.ops import metrics
metrics.instance_received(); metrics.instance_received()
metrics.export_attempt("delivered")
metrics.observe_inference(float(sys.argv[1]))
"""
_READER = """
from prometheus_client import generate_latest
from worker.ops.metrics import process_registry
print(generate_latest(process_registry()).decode())
"""


def test_counters_of_several_processes_are_summed_with_a_multiprocess_dir(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for seconds in ("1.5", "3.0"):  # two worker processes, each gone when it is scraped
        subprocess.run([sys.executable, "-c", _CHILD, seconds], env=env, cwd=REPO, check=True, timeout=60)
    text = subprocess.run([sys.executable, "-c", _READER], env=env, cwd=REPO, check=True, timeout=60,
                          capture_output=True, text=True).stdout
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("ccfnet_instances_received_total", ())] == 4
    assert samples[("ccfnet_export_attempts_total", (("outcome", "delivered"),))] == 2
    assert samples[("ccfnet_inference_seconds_count", ())] == 2
    assert samples[("ccfnet_inference_seconds_sum", ())] == pytest.approx(4.5)
