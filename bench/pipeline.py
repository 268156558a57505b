"""End-to-end latency of the embedded default on this machine: N phantom studies pushed at once.

For each study: seconds from its last instance stored to its results stored, and (with a real Orthanc, unless
--no-orthanc) to its results delivered there, minus the quiet period; and the model's inference milliseconds.

    python bench/pipeline.py [--studies 20] [--quiet 2] [--no-orthanc]
Prints a table; no pass/fail.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "worker"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--quiet", type=float, default=2.0)
    parser.add_argument("--no-orthanc", action="store_true")
    args = parser.parse_args()

    from intake_support import make_settings, send
    from orthanc import ORTHANC, ORTHANC_AE, Orthanc, free_port

    from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME
    from ccfnet_core.phantom import render_study, study_generator
    from worker.db import repository as repo
    from worker.service import EmbeddedService

    use_orthanc = not args.no_orthanc and ORTHANC is not None
    work = Path(tempfile.mkdtemp(prefix="ccfnet-bench-"))
    our_port = free_port()
    pacs = None
    destinations = []
    if use_orthanc:
        pacs = Orthanc(work / "orthanc", free_port(), free_port(), "CCFNET", our_port)
        pacs.folder.mkdir()
        pacs.start()
        destinations = [{"kind": "dicom", "name": "pacs", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                         "port": pacs.dicom_port}]
    studies = [render_study(study_generator(100, i), i) for i in range(args.studies)]
    settings = make_settings(
        work / "var", port=our_port, model_path=MODELS_DIR / PHANTOM_MODEL_NAME, study_quiet_seconds=args.quiet,
        destinations=destinations, log_level="WARNING", reconcile_grace_seconds=60.0,
        max_associations=max(16, args.studies + 4),
    )
    print(f"{args.studies} phantom studies, {sum(len(d) for d, _ in studies)} instances, quiet {args.quiet:g} s, "
          f"results {'delivered to Orthanc' if use_orthanc else 'stored'}", flush=True)
    with EmbeddedService(settings) as svc:
        started = time.perf_counter()
        threads = [threading.Thread(target=send, args=(svc.port, datasets)) for datasets, _ in studies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert svc.sessions is not None
        stored: list[float] = []
        delivered: list[float] = []
        inference_ms: list[float] = []
        not_succeeded: dict[str, int] = {}
        deadline = time.monotonic() + 1800
        pending = {truth.study_uid for _, truth in studies}
        while pending and time.monotonic() < deadline:
            time.sleep(1)
            with svc.sessions() as session:
                for uid in list(pending):
                    jobs = list(repo.jobs_for_study(session, uid))
                    if not jobs or jobs[-1].state not in ("succeeded", "failed", "no_eligible_series", "not_analysed"):
                        continue
                    job = jobs[-1]
                    if job.state != "succeeded":
                        not_succeeded[job.state] = not_succeeded.get(job.state, 0) + 1
                        pending.discard(uid)
                        continue
                    exports = list(repo.exports_for_job(session, job.id))
                    if destinations and not (exports and all(e.state in ("delivered", "dead") for e in exports)):
                        continue
                    last_instance = repo.last_instance_received_at(session, job.study_id)
                    event = [e for e in repo.job_events(session, job.id) if e.kind == "results_written"]
                    assert last_instance is not None and event
                    stored.append((event[0].at - last_instance).total_seconds() - args.quiet)
                    if event[0].detail:
                        inference_ms.append(1000 * float(event[0].detail["inference_seconds"]))
                    times = [e.delivered_at for e in exports]
                    if destinations and all(times):
                        delivered.append((max(t for t in times if t) - last_instance).total_seconds() - args.quiet)
                    elif destinations:
                        not_succeeded["export dead"] = not_succeeded.get("export dead", 0) + 1
                    pending.discard(uid)
        wall = time.perf_counter() - started
    if pacs is not None:
        pacs.stop()
    shutil.rmtree(work, ignore_errors=True)
    rows: list[tuple[str, str]] = [("studies with results", f"{len(stored)}")]
    rows += [(f"studies {state}", f"{count}") for state, count in sorted(not_succeeded.items())]
    rows += [("studies unfinished after 1800 s", f"{len(pending)}")] if pending else []
    rows += _percentiles("last instance -> results stored (s)", stored, "{:.2f}")
    if destinations:
        rows += _percentiles("last instance -> delivered (s)", delivered, "{:.2f}")
    rows += _percentiles("inference ms per study", inference_ms, "{:.1f}")
    rows.append(("wall time (s)", f"{wall:.1f}"))
    for name, value in rows:
        print(f"{name:<44}{value:>10}")


def _percentiles(name: str, values: list[float], fmt: str) -> list[tuple[str, str]]:
    """p50 and p95 (nearest rank) of the values, 'n/a' when there are none."""
    ordered = sorted(values)

    def rank(q: float) -> str:
        return fmt.format(ordered[max(0, math.ceil(q * len(ordered)) - 1)]) if ordered else "n/a"

    return [(f"{name}, p50", rank(0.50)), (f"{name}, p95", rank(0.95))]


if __name__ == "__main__":
    main()
