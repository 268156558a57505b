"""`ccfnet demo`: the whole path of one study with the embedded default, on this machine, in a minute.

Starts the embedded service (SQLite, on-disk broker, worker threads) on a free port, sends one phantom study
with a DICOM C-STORE client, waits for the job, prints the findings and the result objects, stops, exits 0.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import typer

DEMO_AE = "CCFNET"
SENDER_AE = "DEMO_SCU"
TERMINAL = {"succeeded", "failed", "no_eligible_series", "not_analysed", "superseded"}


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _send(port: int, datasets: list[object]) -> list[int]:
    from pynetdicom import AE
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title=SENDER_AE)
    ae.add_requested_context(MRImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=DEMO_AE)
    if not assoc.is_established:
        raise RuntimeError("the demo listener refused the association")
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]  # type: ignore[arg-type]
    finally:
        assoc.release()


MARKER = ".ccfnet-demo"
DEMO_LAYOUT = {"spool", "results", "broker", "ccfnet.sqlite3", "ccfnet.sqlite3-wal", "ccfnet.sqlite3-shm", MARKER}


def _fresh_folder(data_dir: Path) -> None:
    """Empty the demo's working folder, but only one the demo made (never a folder someone pointed it at)."""
    if data_dir.exists() and any(data_dir.iterdir()):
        names = {entry.name for entry in data_dir.iterdir()}
        if not (data_dir / MARKER).is_file() and not names <= DEMO_LAYOUT:
            _say(f"error: {data_dir} is not empty and was not made by `ccfnet demo`; choose another --data-dir")
            raise typer.Exit(2)
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / MARKER).write_text("made by `ccfnet demo`; emptied by its next run\n")


def demo(
    data_dir: Path = typer.Option(Path("var/demo"), help="working folder (emptied first if an earlier demo made it)"),
    seed: int = typer.Option(7, help="phantom seed"),
    timeout: float = typer.Option(300.0, help="seconds to wait for the results"),
    model: Path | None = typer.Option(None, help="checkpoint (default: the shipped phantom model)"),
) -> None:
    """Send a phantom study through the embedded service and print what CCF-Net found."""
    from worker import core_bridge
    from worker.db import repository as repo
    from worker.service import EmbeddedService
    from worker.settings import SettingsError, get_settings

    _fresh_folder(data_dir)
    try:
        # Self-contained whatever the environment says: no outside database, broker, spool, PACS or TLS.
        settings = get_settings(
            data_dir=data_dir, spool_dir=None, database_url=None, broker_url=None, destinations=[],
            port=0, bind_address="127.0.0.1", ae_title=DEMO_AE, allowed_calling_aets=[], allowed_peer_addresses=[],
            tls_cert=None, tls_key=None, tls_ca=None, study_quiet_seconds=2.0,
            sweep_interval_seconds=0.5, reconcile_interval_seconds=5.0, min_free_disk_mb=1,
            model_path=model or core_bridge.phantom_model_path(), log_level="WARNING",
        )
    except SettingsError as exc:
        _say(f"error: {exc}")
        raise typer.Exit(2) from exc
    _say(f"model: {settings.model_path}")
    study = core_bridge.phantom_study(seed)
    study_uid = str(study[0].StudyInstanceUID)  # type: ignore[attr-defined]
    with EmbeddedService(settings) as svc:
        _say(f"listening as {DEMO_AE} on 127.0.0.1:{svc.port}; sending {len(study)} phantom instances")
        try:
            statuses = _send(svc.port, study)
        except (RuntimeError, OSError) as exc:
            _say(f"error: sending the phantom study failed: {exc}")
            raise typer.Exit(1) from exc
        if any(status != 0 for status in statuses):
            _say(f"error: some instances were not stored: {sorted(set(statuses))}")
            raise typer.Exit(1)
        _say(f"stored; waiting {settings.study_quiet_seconds:g} s of quiet, then inference")
        assert svc.sessions is not None
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            with svc.sessions() as session:
                jobs = list(repo.jobs_for_study(session, study_uid))
                job = jobs[-1] if jobs else None
                if job is not None and job.state in TERMINAL:
                    findings = list(repo.findings_for_job(session, job.id))
                    objects = list(repo.result_objects_for_job(session, job.id))
                    break
            time.sleep(0.5)
        else:
            _say(f"error: no result within {timeout:g} s (job state: {job.state if job else 'not created'})")
            raise typer.Exit(1)
    if job.state != "succeeded":
        _say(f"error: job {job.id} ended {job.state}: {job.error}")
        raise typer.Exit(1)
    typer.echo(f"job {job.id}: {job.state}")
    typer.echo(f"{'structure':<10}{'column':>8}{'row':>8}  {'diagnosis':<16}{'P(abnormal)':>12}")
    for f in findings:
        typer.echo(f"{f.structure:<10}{f.column_px:>8.1f}{f.row_px:>8.1f}  {f.diagnosis:<16}{f.probability:>12.2f}")
    typer.echo("result objects:")
    results_dir = settings.data_dir / "results"
    for obj in objects:
        typer.echo(f"  {obj.kind:<5}{(results_dir / obj.path).as_posix()}")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
