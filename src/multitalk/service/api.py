"""The HTTP API (FastAPI). Routes only validate, queue and read; workers do the work.

``create_app(config, store, storage, ...)`` builds the app; ``multitalk serve`` pairs it with an
in-process worker (see ``cli_commands.py``). Every route except ``/healthz`` needs
``Authorization: Bearer <token>`` when tokens are configured.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Annotated, Callable, Literal

from fastapi import BackgroundTasks, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse

import multitalk
from multitalk.errors import UserInputError

from . import problems
from .body_limit import MULTIPART_SLACK, BodyLimit
from .bounds import check_audio, check_params
from .config import ServiceConfig
from .metrics import Metrics
from .outbound import vet
from .schemas import Job, JobList, JobRequest, UploadedFile, ValidationProblem, job_document
from .storage import Storage
from .store import IdempotencyConflict, JobStore
from .uploads import receive_upload
from .worker import download_url, send_webhook

log = logging.getLogger(__name__)


def create_app(config: ServiceConfig, *, store: JobStore | None = None,
               storage: Storage | None = None, metrics: Metrics | None = None,
               ready: Callable[[], bool] | None = None) -> FastAPI:
    """The FastAPI app. ``ready`` reports whether models are loaded (None: always ready)."""
    store = store or JobStore(config.db_path, max_attempts=config.max_attempts)
    storage = storage or Storage(config)
    metrics = metrics or Metrics()
    is_ready = ready or (lambda: True)
    if not config.authenticated:
        log.warning("MULTITALK_API_TOKENS is empty: the API is UNAUTHENTICATED (loopback only)")

    def authorize(authorization: Annotated[str | None, Header()] = None) -> None:
        if not config.authenticated:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not any(
                hmac.compare_digest(token.strip().encode(), t.encode()) for t in config.api_tokens):
            raise HTTPException(401, "missing or invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="MultiTalk", version=multitalk.__version__,
                  description="Audio-driven multi-person talking video generation (job API).",
                  docs_url=None, redoc_url=None, openapi_url=None)   # routes below (config.docs)
    app.state.store, app.state.storage, app.state.metrics = store, storage, metrics
    auth = [Depends(authorize)]
    problem = {422: {"model": ValidationProblem, "description": "field-level input problems"},
               413: {"description": "request body over the limit (answered before reading it)"}}
    _install_safety(app, config, authorize)

    def doc(request: Request, job: dict) -> dict:
        return job_document(job, download_url(storage, config, job, str(request.base_url)))

    def get_job(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:         # on the event loop: answers even with a busy thread pool
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], dependencies=auth)
    def readyz():
        if is_ready():
            return {"ready": True}
        return JSONResponse(status_code=503, content={"ready": False,
                                                      "detail": "models are loading"})

    @app.get("/metrics", tags=["ops"], dependencies=auth, response_class=PlainTextResponse)
    def metrics_route():
        return PlainTextResponse(metrics.render(store.counts(), ready=is_ready()),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/jobs", status_code=202, response_model=Job, tags=["jobs"], dependencies=auth,
              responses={**problem, 409: {"description": "Idempotency-Key reused with another body"}})
    def submit(body: JobRequest, request: Request,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> dict:
        # a plain def: FastAPI runs it in the thread pool, so the storage probe (short
        # timeouts), DNS and the store never block the event loop
        _check_request(body, storage, config)
        payload = body.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(body.identity(payload), sort_keys=True).encode()
                                ).hexdigest()
        try:
            job, _created = store.submit(payload, idempotency_key=idempotency_key,
                                         request_hash=digest)
        except IdempotencyConflict as e:
            raise HTTPException(409, str(e)) from None
        return doc(request, job)

    @app.get("/v1/jobs", response_model=JobList, tags=["jobs"], dependencies=auth)
    def list_jobs(request: Request,
                  status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
                  | None = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")] = None) -> dict:
        jobs, nxt = store.list(status=status, limit=limit,
                               cursor=int(cursor) if cursor else None)
        return {"jobs": [doc(request, j) for j in jobs],
                "next_cursor": str(nxt) if nxt is not None else None}

    @app.get("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"], dependencies=auth)
    def read_job(job_id: str, request: Request) -> dict:
        return doc(request, get_job(job_id))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"], dependencies=auth,
              responses={409: {"description": "the job already finished"}})
    def cancel(job_id: str, request: Request, background: BackgroundTasks) -> dict:
        before = get_job(job_id)
        if before["status"] in ("succeeded", "failed"):
            raise HTTPException(409, f"job {job_id} already {before['status']}")
        job = store.cancel(job_id)
        if before["status"] == "queued" and job["status"] == "cancelled":
            background.add_task(send_webhook, store, storage, config, job_id, metrics)
        return doc(request, job)

    @app.get("/v1/jobs/{job_id}/video", tags=["jobs"], dependencies=auth,
             responses={200: {"content": {"video/mp4": {}}}, 307: {"description": "presigned"}})
    def video(job_id: str):
        job = get_job(job_id)
        if job["status"] != "succeeded" or not job["result"]:
            raise HTTPException(404, f"job {job_id} has no video (status {job['status']})")
        uri = job["result"]["video_uri"]
        signed = storage.presign(uri)
        if signed:
            return RedirectResponse(signed, status_code=307)
        path = storage.local_file(uri)
        if path is None:
            raise HTTPException(410, f"the video {uri} is no longer stored")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.post("/v1/files", status_code=201, response_model=UploadedFile, tags=["files"],
              dependencies=auth, responses={413: {"description": "file larger than the limit"}})
    async def upload(request: Request) -> dict:
        return await receive_upload(request, storage, config.max_upload_bytes)

    return app


def _check_request(body: JobRequest, storage: Storage, config: ServiceConfig) -> None:
    """Every check of a submission that needs no GPU: canonical URIs (stored that way), scope,
    existence, public addresses, bounds. Mutates ``body`` to its canonical form; all problems
    are answered together (InputProblems)."""
    errors: list[UserInputError] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except UserInputError as e:
            errors.append(e)

    media = body.media()
    for field, uri in media.items():
        before = len(errors)
        check(storage.check_input, field, uri)
        if len(errors) == before:
            media[field] = storage.canonical(field, uri)
    body.set_media(media)
    if body.output:
        body.output = check(storage.check_output, "output", body.output) or body.output
    if body.webhook_url:
        check(lambda: vet("webhook_url", body.webhook_url,
                          allow_private=config.allow_private_urls))
    check(check_params, body.params, config)
    if not errors:                          # uploads and local files: bounded before queueing
        local_audio = {f: storage.local_input(f, uri) for f, uri in media.items()
                       if f.startswith("cond_audio.")}
        if all(local_audio.values()):
            check(check_audio, local_audio, body.audio_type, config)
    if errors:
        raise problems.InputProblems(errors)


def _install_safety(app: FastAPI, config: ServiceConfig, authorize) -> None:
    """Body cap, 422 shape without input echo, and the documentation routes per ``docs``."""
    def limit_for(scope) -> int:
        if scope.get("path") == "/v1/files":
            return config.max_upload_bytes + MULTIPART_SLACK
        return config.max_body_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_exception_handler(RequestValidationError, problems.on_request_validation)
    app.add_exception_handler(UserInputError, problems.on_user_input)
    app.add_exception_handler(problems.InputProblems, problems.on_input_problems)
    if config.docs == "off":
        return
    docs_auth = [Depends(authorize)] if config.docs == "token" else []

    @app.get("/openapi.json", include_in_schema=False, dependencies=docs_auth)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=docs_auth)
    def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")
