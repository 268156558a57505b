"""The operations web app: ``/metrics`` for Prometheus, and a server-rendered page for the people on call.

``/`` shows queue depths, jobs by state, dead exports and a jobs table (``?state=failed`` filters it);
``/jobs/{id}`` a job's timeline: events, findings, result objects and exports with every attempt. POST actions
retry a dead export, reprocess a job's study and pause or resume a queue. A pause is a row in
``queue_controls``, so every worker honours it (``worker.queue.tasks`` checks it before claiming).

With ``CCFNET_OPS_TOKEN`` set, every route except ``/metrics`` and the STOW-RS endpoint (which has its own
sender tokens) needs the token: ``Authorization: Bearer``, ``?token=`` (which also sets a SameSite=Strict
cookie so the page's links and forms work), or that cookie. The page shows UIDs and job ids, never patient
names, IDs or birth dates.
"""

from __future__ import annotations

import datetime as dt
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from html import escape
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from celery import Celery
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.orm import Session, sessionmaker

from worker.db import repository as repo
from worker.db.models import JobState
from worker.listener.handlers import IntakeContext
from worker.ops import metrics
from worker.ops.queues import PAUSABLE_QUEUES, set_queue_paused
from worker.ops.status import age_text, collect_status
from worker.ops.stowrs import router as stow_router
from worker.settings import Settings
from worker.timeutil import Clock, utcnow

log = logging.getLogger("worker.ops.web")

TOKEN_COOKIE = "ccfnet_ops_token"
UNPROTECTED_PREFIXES = ("/metrics", "/dicomweb/")
JOB_STATES = tuple(s.value for s in JobState)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.4rem;margin:0 0 1rem}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
table{border-collapse:collapse;font-size:.9rem}td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
th{background:#f3f3f3}.cards{display:flex;gap:1rem;flex-wrap:wrap}
.card{border:1px solid #ccc;border-radius:6px;padding:.5rem 1rem;min-width:12rem}
.state-failed,.state-dead{color:#b00020;font-weight:600}.state-succeeded,.state-delivered{color:#1b5e20}
.paused,.state-not_analysed{color:#b26a00;font-weight:600}form.inline{display:inline}code{font-size:.85rem}
"""


def _page(title: str, body: str) -> HTMLResponse:
    html = (
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(html)


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], *, table_id: str = "") -> str:
    """Cells are HTML already escaped by the caller."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    ident = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _when(value: dt.datetime | None) -> str:
    return escape(value.isoformat(timespec="seconds")) if value else ""


def _state(value: str) -> str:
    return f'<span class="state-{escape(value)}">{escape(value)}</span>'


def _button(action: str, label: str, *, button_id: str) -> str:
    return (
        f'<form class="inline" method="post" action="{escape(action)}">'
        f'<button type="submit" id="{escape(button_id)}">{escape(label)}</button></form>'
    )


def _token_ok(request: Request, expected: str) -> tuple[bool, bool]:
    """(authorised, came by query string)."""
    header = request.headers.get("authorization", "")
    candidates = [
        (header[7:].strip() if header.lower().startswith("bearer ") else "", False),
        (request.query_params.get("token", ""), True),
        (request.cookies.get(TOKEN_COOKIE, ""), False),
    ]
    for given, by_query in candidates:
        if given and hmac.compare_digest(given.encode(), expected.encode()):
            return True, by_query
    return False, False


def create_app(
    settings: Settings,
    sessions: sessionmaker[Session],
    celery: Celery,
    *,
    intake: IntakeContext | None = None,
    clock: Clock = utcnow,
) -> FastAPI:
    app = FastAPI(title="ccfnet-worker operations", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.intake = intake
    registry = metrics.scrape_registry(settings, sessions, clock)
    token = settings.ops_token.get_secret_value() if settings.ops_token else None

    @app.middleware("http")
    async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if token is None or request.url.path.startswith(UNPROTECTED_PREFIXES):
            return await call_next(request)
        ok, by_query = _token_ok(request, token)
        if not ok:
            return Response("an operations token is required\n", status_code=401,
                            headers={"WWW-Authenticate": "Bearer"}, media_type="text/plain")
        response = await call_next(request)
        if by_query:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        return response

    @app.get("/metrics")
    def scrape() -> Response:
        body, content_type = metrics.render(registry)
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    def index(state: str | None = None) -> HTMLResponse:
        if state and state not in JOB_STATES:
            raise HTTPException(400, f"unknown state {state!r}")
        with sessions() as session:
            status = collect_status(settings, session, clock())
            jobs = repo.list_jobs(session, state=state, limit=200)
        return _page("ccfnet-worker operations", _overview(status) + _jobs(jobs, state))

    @app.get("/status.json")
    def status_json() -> Response:
        with sessions() as session:
            status = collect_status(settings, session, clock())
        return Response(json.dumps(status), media_type="application/json")

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(job_id: int) -> HTMLResponse:
        with sessions() as session:
            found = repo.job_with_study(session, job_id)
            if found is None:
                raise HTTPException(404, f"no job {job_id}")
            body = _job_detail(session, *found)
        return _page(f"Job {job_id}", body)

    @app.post("/exports/{export_id}/retry")
    def retry_export(export_id: int, request: Request) -> RedirectResponse:
        from worker.export.engine import attempt_export

        with sessions.begin() as session:
            export = repo.get_export(session, export_id)
            if export is None:
                raise HTTPException(404, f"no export {export_id}")
            job_id = export.job_id
            revived = repo.revive_dead_export(session, export_id, now=clock())
        if not revived:
            raise HTTPException(409, f"export {export_id} is not dead")
        result = attempt_export(export_id, settings, sessions, clock)
        log.info("export %d retried from the ops page: %s", export_id, result.state)
        return _back(request, f"/jobs/{job_id}")

    @app.post("/jobs/{job_id}/reprocess")
    def reprocess_job(job_id: int) -> RedirectResponse:
        from worker.inference import configured_model_version
        from worker.ops.reprocess import reprocess

        with sessions() as session:
            job = repo.get_job(session, job_id)
            study = repo.get_study(session, job.study_id) if job is not None else None
        if study is None:
            raise HTTPException(404, f"no job {job_id}")
        made = reprocess(sessions, celery, [study], model_version=configured_model_version(settings), now=clock())
        log.info("job %d: study reprocessed from the ops page as job %s", job_id, made[0].job_id)
        return RedirectResponse(f"/jobs/{made[0].job_id or job_id}", status_code=303)

    def _set_paused(queue: str, paused: bool, request: Request) -> RedirectResponse:
        if queue not in PAUSABLE_QUEUES:
            raise HTTPException(404, f"no pausable queue {queue!r}")
        set_queue_paused(sessions, celery, queue, paused=paused, clock=clock)
        log.warning("queue %s %s from the ops page", queue, "paused" if paused else "resumed")
        return _back(request, "/")

    @app.post("/queue/{queue}/pause")
    def pause(queue: str, request: Request) -> RedirectResponse:
        return _set_paused(queue, True, request)

    @app.post("/queue/{queue}/resume")
    def resume(queue: str, request: Request) -> RedirectResponse:
        return _set_paused(queue, False, request)

    app.include_router(stow_router)  # STOW-RS: its own sender tokens, not the ops token
    return app


def _back(request: Request, default: str) -> RedirectResponse:
    """Back to the page the form was on (same site only), else `default`."""
    referer = request.headers.get("referer", "")
    base = str(request.base_url)
    if not referer.startswith(base):
        return RedirectResponse(default, status_code=303)
    url = urlsplit(referer)
    query = urlencode([(k, v) for k, v in parse_qsl(url.query) if k != "token"])  # the cookie has it now
    return RedirectResponse(url.path + (f"?{query}" if query else ""), status_code=303)


def _overview(status: dict[str, Any]) -> str:
    queue_rows = []
    for queue, depth in status["queues"].items():
        is_paused = queue in status["paused_queues"]
        verb = "resume" if is_paused else "pause"
        action = (_button(f"/queue/{queue}/{verb}", verb.capitalize(), button_id=f"{verb}-{queue}")
                  if queue in PAUSABLE_QUEUES else "")
        queue_rows.append([
            escape(queue), "?" if depth is None else str(depth),
            '<span class="paused">paused</span>' if is_paused else "running", action,
        ])
    state_rows = [[_state(s), str(n)] for s, n in sorted(status["jobs_by_state"].items())]
    cards = (
        f'<div class="cards"><div class="card">Studies waiting: <b id="studies-waiting">{status["studies_waiting"]}'
        f'</b></div><div class="card">Oldest queued job: <b>{age_text(status["oldest_queued_job_seconds"])}</b></div>'
        f'<div class="card">Last hour: <b>{status["throughput_last_hour"]["succeeded"]}</b> succeeded, '
        f'<b>{status["throughput_last_hour"]["failed"]}</b> failed</div></div>'
    )
    dead_rows = [
        [str(d["export"]), f'<a href="/jobs/{d["job"]}">{d["job"]}</a>', escape(d["destination"]),
         str(d["attempts"]), escape(d["error"] or ""),
         _button(f"/exports/{d['export']}/retry", "Retry", button_id=f"retry-{d['export']}")]
        for d in status["dead_exports"]
    ]
    return (
        cards
        + "<h2>Queues</h2>" + _table(["queue", "messages", "state", ""], queue_rows, table_id="queues")
        + "<h2>Jobs by state</h2>" + _table(["state", "jobs"], state_rows, table_id="jobs-by-state")
        + "<h2>Dead exports</h2>"
        + (_table(["export", "job", "destination", "attempts", "last error", ""], dead_rows, table_id="dead-exports")
           if dead_rows else "<p>None.</p>")
    )


def _jobs(jobs: list[tuple[Any, str]], state: str | None) -> str:
    options = "".join(
        f'<option value="{s}"{" selected" if s == state else ""}>{s}</option>' for s in ("", *JOB_STATES)
    )
    filter_form = (
        f'<form method="get" action="/"><label>State <select name="state" onchange="this.form.submit()">{options}'
        f"</select></label> <noscript><button type=submit>Filter</button></noscript></form>"
    )
    rows = [
        [f'<a href="/jobs/{job.id}">{job.id}</a>', f"<code>{escape(uid)}</code>", _state(job.state),
         escape(job.queue), str(job.instance_count), _when(job.created_at), _when(job.updated_at),
         escape((job.error or "")[:120])]
        for job, uid in jobs
    ]
    return (
        f"<h2>Jobs{' (' + escape(state) + ')' if state else ''}</h2>" + filter_form
        + _table(["job", "study", "state", "queue", "instances", "created", "updated", "error"], rows,
                 table_id="jobs")
    )


def _job_detail(session: Session, job: Any, study_uid: str) -> str:
    summary = _table(["", ""], [
        ["study", f"<code>{escape(study_uid)}</code>"], ["state", _state(job.state)], ["queue", escape(job.queue)],
        ["model", escape(job.model_version)], ["instances", str(job.instance_count)],
        ["attempts", str(job.attempts)], ["created", _when(job.created_at)], ["finished", _when(job.finished_at)],
        ["error", escape(job.error or "")],
    ], table_id="job")
    actions = _button(f"/jobs/{job.id}/reprocess", "Reprocess study", button_id="reprocess")
    events = _table(["at", "event", "detail"], [
        [_when(e.at), escape(e.kind), f"<code>{escape(json.dumps(e.detail))}</code>" if e.detail else ""]
        for e in repo.job_events(session, job.id)
    ], table_id="events")
    findings = _table(["structure", "kind", "label", "diagnosis", "probability", "confidence"], [
        [escape(f.structure), escape(f.kind), escape(f.label), escape(f.diagnosis), f"{f.probability:.3f}",
         f"{f.confidence:.3f}"]
        for f in repo.findings_for_job(session, job.id)
    ], table_id="findings")
    objects = _table(["kind", "SOP instance UID", "size", "created"], [
        [escape(o.kind), f"<code>{escape(o.sop_instance_uid)}</code>", str(o.size_bytes), _when(o.created_at)]
        for o in repo.result_objects_for_job(session, job.id)
    ], table_id="objects")
    export_rows = []
    for e in repo.exports_for_job(session, job.id):
        tries = "<br>".join(
            f"{_when(a.started_at)} {escape(a.outcome)}"
            + (f" {a.status_code:#06x}" if a.status_code is not None else "")
            + (f" {escape(a.error)}" if a.error else "")
            for a in repo.export_attempts(session, e.id)
        )
        retry = _button(f"/exports/{e.id}/retry", "Retry", button_id=f"retry-{e.id}") if e.state == "dead" else ""
        export_rows.append([str(e.id), escape(e.destination), _state(e.state), str(e.attempts),
                            escape(e.last_error or ""), tries, retry])
    exports = _table(["export", "destination", "state", "attempts", "last error", "tries", ""], export_rows,
                     table_id="exports")
    query = urlencode({"state": job.state})
    return (
        f'<p><a href="/">All jobs</a> · <a href="/?{escape(query)}">{escape(job.state)} jobs</a></p>'
        + summary + f"<p>{actions}</p>"
        + "<h2>Timeline</h2>" + events + "<h2>Findings</h2>" + findings
        + "<h2>Result objects</h2>" + objects + "<h2>Exports</h2>" + exports
    )
