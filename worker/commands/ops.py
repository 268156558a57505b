"""`ccfnet status`, `ccfnet jobs list|show`, `ccfnet queue pause|resume`, `ccfnet reprocess`: thin commands over
worker.ops."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer

jobs_app = typer.Typer(help="List jobs and show one job's whole record.", no_args_is_help=True)
queue_app = typer.Typer(help="Pause or resume the inference and batch queues (every worker honours it).",
                        no_args_is_help=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def _database() -> Iterator[tuple[Any, Any]]:
    """The service's existing database (never a new, empty one): a wrong path or URL is one line naming the
    setting and exit code 2; a schema behind the code, exit code 3."""
    from worker.commands.common import EXIT_SCHEMA
    from worker.db.engine import DatabaseUnavailableError, make_session_factory, open_existing
    from worker.db.migrate import SchemaOutdatedError, ensure_schema
    from worker.settings import SettingsError, get_settings

    try:
        settings = get_settings()
    except SettingsError as exc:
        _fail(str(exc))
    setting = "CCFNET_DATABASE_URL" if settings.database_url is not None else "CCFNET_DATA_DIR"
    try:
        engine = open_existing(settings.effective_database_url, setting)
    except DatabaseUnavailableError as exc:
        _fail(str(exc))
    try:
        ensure_schema(engine, apply=False)
    except SchemaOutdatedError as exc:
        engine.dispose()
        _fail(str(exc), EXIT_SCHEMA)
    try:
        yield settings, make_session_factory(engine)
    finally:
        engine.dispose()


def _parse_time(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        _fail(f"{name}: not an ISO date/time: {value!r}")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _counts(by_state: dict[str, int]) -> str:
    return "  ".join(f"{s} {n}" for s, n in sorted(by_state.items())) or "none"


def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Queue depth, paused queues, jobs by state, oldest waiting study and job, throughput, failures, dead
    exports."""
    from worker.ops.status import age_text, association_status, collect_status
    from worker.timeutil import utcnow

    with _database() as (settings, sessions), sessions() as session:
        now = utcnow()
        report = collect_status(settings, session, now) | association_status(session, now)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo("queues:   " + "  ".join(
        f"{q} {n if n is not None else '?'}{' (paused)' if q in report['paused_queues'] else ''}"
        for q, n in report["queues"].items()
    ))
    typer.echo("jobs:     " + _counts(report["jobs_by_state"]))
    oldest_study = report["oldest_waiting_study_seconds"]
    typer.echo(f"waiting:  {report['studies_waiting']} studies"
               + (f" (oldest {age_text(oldest_study)})" if oldest_study is not None else "")
               + f"; oldest queued job {age_text(report['oldest_queued_job_seconds'])}")
    hour = report["throughput_last_hour"]
    typer.echo(f"last hour: {hour['succeeded']} succeeded, {hour['failed']} failed")
    open_assocs = report["associations_open"]
    typer.echo(f"dicom:    {len(open_assocs)} open association(s)"
               + "".join(f"; {a['calling_ae']}@{a['peer']} {age_text(a['seconds'])}" for a in open_assocs[:5]))
    if report["associations_refused_last_hour"]:
        typer.echo("refused/aborted last hour: " + _counts(report["associations_refused_last_hour"]))
    typer.echo("exports:  " + _counts(report["exports_by_state"]))
    for failure in report["recent_failures"][:5]:
        typer.echo(f"  failed job {failure['job']}: {failure['reason']}")
    for dead in report["dead_exports"][:5]:
        typer.echo(f"  dead export {dead['export']} (job {dead['job']}) to {dead['destination']}: {dead['error']}")


@jobs_app.command("list")
def jobs_list(
    state: str | None = typer.Option(None, help="only jobs in this state"),
    since: str | None = typer.Option(None, help="only jobs created since (ISO date/time, UTC)"),
    limit: int | None = typer.Option(None, min=1, help="at most this many (newest first); default all"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Every job in every state, newest first, each with its StudyInstanceUID."""
    from worker.db import repository as repo

    since_time = _parse_time(since, "--since")
    with _database() as (_, sessions), sessions() as session:
        rows = [
            {"id": job.id, "study": uid, "state": job.state, "queue": job.queue, "instances": job.instance_count,
             "created": _iso(job.created_at), "finished": _iso(job.finished_at), "error": job.error,
             "superseded_by": job.superseded_by}
            for job, uid in repo.list_jobs(session, state=state, since=since_time, limit=limit)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(f"{row['id']:>6}  {row['state']:<19}{row['queue']:<10}{row['created']}  {row['study']}")


@jobs_app.command("show")
def jobs_show(job_id: int = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """One job: events, findings, result objects and export attempts."""
    from worker.db import repository as repo

    with _database() as (_, sessions), sessions() as session:
        job = repo.get_job(session, job_id)
        if job is None:
            _fail(f"no job {job_id}", 1)
        assert job is not None
        record: dict[str, Any] = {
            "id": job.id, "state": job.state, "queue": job.queue, "error": job.error,
            "events": [
                {"at": _iso(e.at), "kind": e.kind, "detail": e.detail} for e in repo.job_events(session, job_id)
            ],
            "findings": [
                {"structure": f.structure, "column": f.column_px, "row": f.row_px, "diagnosis": f.diagnosis,
                 "probability": f.probability} for f in repo.findings_for_job(session, job_id)
            ],
            "result_objects": [
                {"kind": o.kind, "sop_instance_uid": o.sop_instance_uid, "path": o.path}
                for o in repo.result_objects_for_job(session, job_id)
            ],
            "exports": [
                {"id": e.id, "destination": e.destination, "state": e.state, "attempts": [
                    {"outcome": a.outcome, "status": a.status_code, "error": a.error, "at": _iso(a.started_at)}
                    for a in repo.export_attempts(session, e.id)
                ]} for e in repo.exports_for_job(session, job_id)
            ],
        }
    if as_json:
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo(f"job {record['id']}: {record['state']} ({record['queue']})" +
               (f" - {record['error']}" if record["error"] else ""))
    for event in record["events"]:
        typer.echo(f"  {event['at']}  {event['kind']}")
    for finding in record["findings"]:
        typer.echo(f"  {finding['structure']:<8}{finding['diagnosis']:<16}{finding['probability']:.2f}")
    for export in record["exports"]:
        typer.echo(f"  export {export['id']} to {export['destination']}: {export['state']}, "
                   f"{len(export['attempts'])} attempt(s)")


def reprocess(
    study: list[str] = typer.Option([], "--study", help="StudyInstanceUID (repeatable)"),
    uid_file: Path | None = typer.Option(None, "--file", help="a file of StudyInstanceUIDs, one per line"),
    since: str | None = typer.Option(None, help="studies received since (ISO, UTC)"),
    until: str | None = typer.Option(None, help="studies received before (ISO, UTC)"),
    state: str | None = typer.Option(None, help="studies whose latest job is in this state, e.g. failed"),
    accession: list[str] = typer.Option([], "--accession", help="AccessionNumber (repeatable; with --from pacs)"),
    source: str = typer.Option("spool", "--from", help="spool, or pacs (CCFNET_REPROCESS_SOURCE)"),
    model: Path | None = typer.Option(
        None, "--model", help="force this checkpoint for these jobs (a path the workers can read)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would run and change nothing"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run studies again on the low-priority batch queue; their new results supersede the old ones."""
    from tqdm import tqdm

    from worker.db import repository as repo
    from worker.inference import configured_model_version
    from worker.ops.reprocess import ForcedModel, plan
    from worker.ops.reprocess import reprocess as run_reprocess
    from worker.queue.celery_app import make_celery
    from worker.timeutil import utcnow

    if source not in ("spool", "pacs"):
        _fail(f"--from must be spool or pacs, got {source!r}")
    if accession and source != "pacs":
        _fail("--accession needs --from pacs (accession numbers are looked up in the PACS)")
    uids = list(study)
    if uid_file is not None:
        if not uid_file.is_file():
            _fail(f"no such file: {uid_file}")
        uids += [line.strip() for line in uid_file.read_text().splitlines() if line.strip()]
    if not (uids or accession or since or until or state):
        _fail("choose studies with --study, --accession, --file, --since/--until or --state")
    forced: ForcedModel | None = None
    if model is not None:
        try:
            forced = ForcedModel.from_file(model)
        except (ValueError, OSError) as exc:
            _fail(str(exc))
    with _database() as (settings, sessions):
        if source == "pacs":
            uids = _pull_from_pacs(settings, sessions, uids, accession, dry_run)
        with sessions() as session:
            studies = repo.studies_for_reprocess(
                session, uids=uids, since=_parse_time(since, "--since"), until=_parse_time(until, "--until"),
                last_job_state=state,
            )
        missing = sorted(set(uids) - {s.study_instance_uid for s in studies}) if uids else []
        if dry_run and source == "pacs":
            typer.echo(json.dumps({"dry_run": True, "from": "pacs", "studies": [{"study": uid} for uid in uids]},
                                  indent=2) if as_json else "\n".join(f"would pull and queue {uid}" for uid in uids))
            return
        checked = plan(sessions, studies, settings.spool_path)
        incomplete = [p for p in checked if p.missing_files]
        complete = {p.study_instance_uid for p in checked if not p.missing_files}
        if dry_run:
            planned = [p for p in checked if not p.missing_files]
        else:
            runnable = [s for s in studies if s.study_instance_uid in complete]
            app = make_celery(settings)
            with tqdm(total=len(runnable), desc="reprocess", file=sys.stderr) as bar:
                planned = run_reprocess(sessions, app, runnable, model_version=configured_model_version(settings),
                                        now=utcnow(), progress=bar.update, source=source, model=forced)
            app.close()
    rows = [{"study": p.study_instance_uid, "instances": p.instances, "job": p.job_id} for p in planned]
    gone = [{"study": p.study_instance_uid, "instances": p.instances, "missing_files": p.missing_files}
            for p in incomplete]
    if as_json:
        typer.echo(json.dumps({"dry_run": dry_run, "studies": rows, "not_found": missing,
                               "spool_files_missing": gone}, indent=2))
    else:
        for row in rows:
            job = f"  -> job {row['job']}" if row["job"] else ""
            typer.echo(f"{row['study']}  {row['instances']} instances{job}")
        for uid in missing:
            typer.echo(f"not found: {uid} (not in the database; `--from pacs` pulls it from the PACS)")
        for entry in gone:
            typer.echo(f"not queued: {entry['study']}: {entry['missing_files']} of {entry['instances']} spool files "
                       "are gone; run it again with `--from pacs`")
        typer.echo(f"{len(rows)} studies {'would be' if dry_run else ''} queued on batch".replace("  ", " "))
    if missing or gone:
        raise typer.Exit(1)


def _pull_from_pacs(
    settings: Any, sessions: Any, uids: list[str], accessions: list[str], dry_run: bool
) -> list[str]:
    """Find the studies in the PACS (by accession) and, unless a dry run, pull them into the spool."""
    from worker.listener.handlers import AdmissionPolicy, IntakeContext
    from worker.ops.pull import PullError, find_studies, pull_study
    from worker.spool import Spool

    source = settings.reprocess_source
    if source is None:
        _fail("--from pacs needs CCFNET_REPROCESS_SOURCE (a DICOMweb or DICOM source, as in CCFNET_DESTINATIONS)")
    try:
        found = find_studies(source, settings.ae_title, accessions) if accessions else []
    except PullError as exc:
        _fail(str(exc), 1)
    wanted = list(dict.fromkeys([*uids, *found]))
    if accessions and not found:
        _fail(f"no study in {source.name} has accession {', '.join(accessions)}", 1)
    if dry_run:
        return wanted
    spool = Spool(settings.spool_path, min_free_bytes=settings.min_free_disk_mb * 1024 * 1024)
    spool.prepare()
    ctx = IntakeContext(spool=spool, sessions=sessions,
                        policy=AdmissionPolicy(settings.ae_title, frozenset(), ()), listener_name="reprocess")
    for uid in wanted:
        try:
            pulled = pull_study(ctx, source, settings.ae_title, uid)
        except PullError as exc:
            _fail(f"{uid}: {exc}", 1)
        typer.echo(f"pulled {uid} from {source.name}: {pulled.stored} stored, {pulled.failed} failed", err=True)
    return wanted


def _set_paused(queue: str, paused: bool) -> None:
    from worker.ops.queues import set_queue_paused
    from worker.queue.celery_app import make_celery
    from worker.timeutil import utcnow

    with _database() as (settings, sessions):
        app = make_celery(settings)
        try:
            published = set_queue_paused(sessions, app, queue, paused=paused, clock=utcnow)
        except ValueError as exc:  # not a pausable queue
            _fail(str(exc))
        finally:
            app.close()
    typer.echo(f"queue {queue} {'paused' if paused else 'resumed'}"
               + (f"; {len(published)} queued job(s) published" if published else ""))


@queue_app.command("pause")
def queue_pause(queue: str = typer.Argument(..., help="inference or batch")) -> None:
    """Stop workers taking jobs from the queue (running jobs finish; new ones wait, queued)."""
    _set_paused(queue, True)


@queue_app.command("resume")
def queue_resume(queue: str = typer.Argument(..., help="inference or batch")) -> None:
    """Let workers take jobs from the queue again; its queued jobs are published at once."""
    _set_paused(queue, False)


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(queue_app, name="queue")
    app.command("reprocess")(reprocess)
