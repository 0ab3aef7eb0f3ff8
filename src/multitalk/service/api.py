"""The HTTP API (FastAPI). Routes only validate, queue and read; workers do the work.

``create_app(config, store, storage, ...)`` builds the app; ``multitalk serve`` pairs it with an
in-process worker (see ``cli_commands.py``). Every route except ``/healthz`` needs
``Authorization: Bearer <token>`` when tokens are configured.

Tenants: each token has a name (``MULTITALK_API_TOKENS=name:token,...``). Jobs, uploads and
idempotency keys belong to that name; another tenant's job or upload answers exactly as a missing
one (404, or 422 "does not exist"). Admin tokens (``MULTITALK_ADMIN_TOKENS``) see and cancel
every job. Without tokens (loopback only) everything belongs to the tenant ``default``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Annotated, Callable, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

import multitalk
from multitalk.errors import UserInputError

from . import metrics as prom
from . import problems
from .body_limit import MULTIPART_SLACK, BodyLimit
from .bounds import check_audio, check_params
from .config import DEFAULT_TENANT, ServiceConfig
from .links import download_url
from .outbound import vet
from .schemas import Job, JobList, JobRequest, UploadedFile, ValidationProblem, job_document
from .storage import Storage, not_readable
from .store import IdempotencyConflict, JobStore, QuotaExceeded, StoreUnavailable, open_store
from .uploads import receive_upload

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant name; an admin sees every tenant's jobs."""
    name: str
    admin: bool

    @property
    def scope(self) -> str | None:
        """The owner filter of reads: None (all tenants) for an admin."""
        return None if self.admin else self.name


def authorize(request: Request,
              authorization: Annotated[str | None, Header()] = None) -> Principal:
    """The caller of a request from its bearer token (401 without a known one)."""
    principals: dict[bytes, Principal] = request.app.state.principals
    if not principals:
        return Principal(DEFAULT_TENANT, admin=True)     # unauthenticated, loopback only
    scheme, _, token = (authorization or "").partition(" ")
    found = None
    if scheme.lower() == "bearer":
        given = token.strip().encode()
        for known, principal in principals.items():      # compare with every token
            if hmac.compare_digest(given, known):
                found = principal
    if found is None:
        raise HTTPException(401, "missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})
    return found


Caller = Annotated[Principal, Depends(authorize)]


def create_app(config: ServiceConfig, *, store: JobStore | None = None,
               storage: Storage | None = None, ready: Callable[[], bool] | None = None
               ) -> FastAPI:
    """The FastAPI app. ``ready`` reports whether models are loaded (None: always ready)."""
    store = store or open_store(config.db_url, max_attempts=config.max_attempts)
    storage = storage or Storage(config)
    prom.multiprocess_dir(config.metrics_path)
    is_ready = ready or (lambda: True)
    if not config.authenticated:
        log.warning("MULTITALK_API_TOKENS is empty: the API is UNAUTHENTICATED (loopback only)")

    app = FastAPI(title="MultiTalk", version=multitalk.__version__,
                  description="Audio-driven multi-person talking video generation (job API).",
                  docs_url=None, redoc_url=None, openapi_url=None)   # routes below (config.docs)
    app.state.store, app.state.storage = store, storage
    app.state.principals = {token.encode(): Principal(name, admin)
                            for token, (name, admin) in config.principals().items()}
    auth = [Depends(authorize)]
    problem = {422: {"model": ValidationProblem, "description": "field-level input problems"},
               413: {"description": "request body over the limit (answered before reading it)"}}
    _install_safety(app, config, authorize)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, e: StoreUnavailable):
        log.warning("job store unavailable: %s", e)
        return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                            content={"detail": "the job store is unavailable; retry shortly"})

    def doc(request: Request, job: dict) -> dict:
        return job_document(job, download_url(storage, config, job, str(request.base_url)))

    def get_job(job_id: str, caller: Principal) -> dict:
        job = store.get(job_id, owner=caller.scope)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def check_upload(field: str, uri: str, caller: Principal) -> None:
        """An upload:// input must be one of the caller's uploads (else: as if missing)."""
        if uri.startswith("upload://") and store.get_upload(
                uri[len("upload://"):], owner=caller.scope) is None:
            raise not_readable(field, uri)        # the same answer as a missing upload

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:         # on the event loop: answers even with a busy thread pool
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], dependencies=auth)
    def readyz():
        if is_ready():
            return {"ready": True}
        return JSONResponse(status_code=503, content={"ready": False,
                                                      "detail": "models are loading"})

    @app.get("/metrics", tags=["ops"], dependencies=auth)
    def metrics_route():
        return Response(prom.render(store.counts, is_ready), media_type=prom.CONTENT_TYPE)

    @app.post("/v1/jobs", status_code=202, response_model=Job, tags=["jobs"],
              responses={**problem,
                         409: {"description": "Idempotency-Key reused with another body"},
                         429: {"description": "the tenant's queue quota is full"}})
    def submit(body: JobRequest, request: Request, caller: Caller,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> dict:
        if body.webhook_url and not config.webhooks_enabled:
            raise UserInputError("webhook_url", "webhooks are disabled on this server (no "
                                 "signing secret)", "poll GET /v1/jobs/{id}, or ask the "
                                 "operator to set MULTITALK_WEBHOOK_SECRET")
        # a plain def: FastAPI runs it in the thread pool, so the storage probe (bounded), DNS
        # and the store never block the event loop
        _check_request(body, storage, config, lambda field, uri: check_upload(field, uri, caller))
        payload = body.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(body.identity(payload), sort_keys=True).encode()
                                ).hexdigest()
        try:
            job, _created = store.submit(payload, owner=caller.name,
                                         idempotency_key=idempotency_key, request_hash=digest,
                                         quota=config.quota_for(caller.name))
        except IdempotencyConflict as e:
            raise HTTPException(409, str(e)) from None
        except QuotaExceeded as e:
            raise HTTPException(429, f"{e}; wait for a job to finish",
                                headers={"Retry-After": "30"}) from None
        return doc(request, job)

    @app.get("/v1/jobs", response_model=JobList, tags=["jobs"])
    def list_jobs(request: Request, caller: Caller,
                  status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
                  | None = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$")] = None) -> dict:
        jobs, nxt = store.list(owner=caller.scope, status=status, limit=limit,
                               cursor=int(cursor) if cursor else None)
        return {"jobs": [doc(request, j) for j in jobs],
                "next_cursor": str(nxt) if nxt is not None else None}

    @app.get("/v1/jobs/{job_id}", response_model=Job, tags=["jobs"])
    def read_job(job_id: str, request: Request, caller: Caller) -> dict:
        return doc(request, get_job(job_id, caller))

    @app.post("/v1/jobs/{job_id}/cancel", response_model=Job, tags=["jobs"],
              responses={409: {"description": "the job already finished"}})
    def cancel(job_id: str, request: Request, caller: Caller) -> dict:
        before = get_job(job_id, caller)
        if before["status"] in ("succeeded", "failed"):
            raise HTTPException(409, f"job {job_id} already {before['status']}")
        job = store.cancel(job_id, owner=caller.scope)      # a queued job's webhook: outbox
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return doc(request, job)

    @app.get("/v1/jobs/{job_id}/video", tags=["jobs"],
             responses={200: {"content": {"video/mp4": {}}}, 307: {"description": "presigned"},
                        410: {"description": "deleted by retention"}})
    def video(job_id: str, caller: Caller):
        job = get_job(job_id, caller)
        if job["status"] != "succeeded" or not job["result"]:
            raise HTTPException(404, f"job {job_id} has no video (status {job['status']})")
        if job["output_deleted_at"]:
            raise HTTPException(410, f"the video of job {job_id} was deleted (retention)")
        uri = job["result"]["video_uri"]
        signed = storage.presign(uri)
        if signed:
            return RedirectResponse(signed, status_code=307)
        path = storage.local_file(uri)
        if path is None:
            raise HTTPException(410, f"the video {uri} is no longer stored")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.post("/v1/files", status_code=201, response_model=UploadedFile, tags=["files"],
              responses={413: {"description": "file larger than the limit"}})
    async def upload(request: Request, caller: Caller) -> dict:
        received = await receive_upload(request, storage, config.max_upload_bytes)
        try:
            await run_in_threadpool(store.add_upload, received["uri"][len("upload://"):],
                                    caller.name, filename=received["filename"],
                                    size=received["size"])
        except BaseException:
            storage.config.uploads_dir.joinpath(received["uri"][len("upload://"):]).unlink(
                missing_ok=True)
            raise
        return received

    return app


def _check_request(body: JobRequest, storage: Storage, config: ServiceConfig,
                   check_owner: Callable[[str, str], None]) -> None:
    """Every check of a submission that needs no GPU: canonical URIs (stored that way), the
    caller's ownership of uploads (``check_owner(field, canonical uri)``), scope, existence,
    public addresses, bounds. Mutates ``body`` to its canonical form; all problems are answered
    together (InputProblems)."""
    errors: list[UserInputError] = []

    def check(fn, *args):
        try:
            return fn(*args)
        except UserInputError as e:
            errors.append(e)

    media = body.media()
    for field, uri in media.items():
        before = len(errors)
        canonical = check(storage.canonical, field, uri)     # "UPLOAD://" is "upload://"
        if canonical is not None:
            check(check_owner, field, canonical)
        if len(errors) == before:
            check(storage.check_input, field, canonical)
        if len(errors) == before:
            media[field] = canonical
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
