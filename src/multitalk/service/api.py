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
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from python_multipart.multipart import MultipartParser, parse_options_header

import multitalk
from multitalk.errors import UserInputError

from . import metrics as prom
from .config import DEFAULT_TENANT, ServiceConfig
from .links import download_url
from .schemas import Job, JobList, JobRequest, UploadedFile, ValidationProblem, job_document
from .storage import Storage, check_public_url
from .store import IdempotencyConflict, JobStore, QuotaExceeded, StoreUnavailable, open_store

log = logging.getLogger(__name__)

_DRAIN_FACTOR = 4           # read at most this many times the upload limit before hanging up


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
                  description="Audio-driven multi-person talking video generation (job API).")
    app.state.store, app.state.storage = store, storage
    app.state.principals = {token.encode(): Principal(name, admin)
                            for token, (name, admin) in config.principals().items()}
    auth = [Depends(authorize)]
    problem = {422: {"model": ValidationProblem, "description": "field-level input problems"}}

    @app.exception_handler(UserInputError)
    async def _user_input(request: Request, e: UserInputError):
        return JSONResponse(status_code=422, content=_problem(e))

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
            raise UserInputError(field, f"upload {uri!r} does not exist",
                                 "upload the file with POST /v1/files first")

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
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
        for field, uri in body.media().items():
            storage.check_input(field, uri)
            check_upload(field, uri, caller)
        if body.output:
            storage.check_output("output", body.output)
        if body.webhook_url:
            if not config.webhooks_enabled:
                raise UserInputError("webhook_url", "webhooks are disabled on this server (no "
                                     "signing secret)", "poll GET /v1/jobs/{id}, or ask the "
                                     "operator to set MULTITALK_WEBHOOK_SECRET")
            check_public_url("webhook_url", body.webhook_url,
                             allow_private=config.allow_private_urls)
        payload = body.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
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
        received = await _receive_upload(request, storage, config.max_upload_bytes)
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


def _problem(e: UserInputError) -> dict:
    loc = ["body", *[int(p) if p.isdigit() else p for p in e.field.split(".")]]
    return {"detail": [{"loc": loc, "msg": e.message, "type": "user_input", "fix": e.fix}]}


async def _receive_upload(request: Request, storage: Storage, limit: int) -> dict:
    """Stream the multipart field ``file`` to disk, never holding it in memory."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UserInputError("file", "expected multipart/form-data with a 'file' field",
                             "curl -F file=@audio.wav ...")
    state = {"headers": {}, "field": b"", "value": b"", "out": None, "size": 0, "too_big": False,
             "uri": None, "path": None, "filename": None, "seen": False}

    def on_part_begin():
        state["headers"] = {}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        _, disp = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if disp.get(b"name") == b"file" and not state["seen"]:
            state["seen"] = True
            filename = disp.get(b"filename", b"").decode("utf-8", "replace") or None
            state["filename"] = filename
            state["uri"], state["path"] = storage.new_upload(filename)
            state["out"] = open(state["path"], "wb")

    def on_part_data(data, start, end):
        out = state["out"]
        if out is None or state["too_big"]:
            return
        state["size"] += end - start
        if state["size"] > limit:
            state["too_big"] = True
            return
        out.write(data[start:end])

    def on_part_end():
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end})
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > _DRAIN_FACTOR * limit + (1 << 20):
                state["too_big"] = True
                break
            if not state["too_big"]:
                parser.write(chunk)        # past the limit: drain without parsing
        if not state["too_big"]:
            parser.finalize()
    except Exception as e:  # malformed multipart
        _discard(state)
        raise UserInputError("file", f"malformed multipart body ({e})", "send one 'file' field"
                             ) from None
    if state["too_big"]:
        _discard(state)
        raise HTTPException(413, f"file larger than {limit} bytes")
    if not state["seen"]:
        raise UserInputError("file", "no 'file' field in the form", "curl -F file=@audio.wav ...")
    return {"uri": state["uri"], "size": state["size"], "filename": state["filename"]}


def _discard(state: dict) -> None:
    if state["out"] is not None:
        state["out"].close()
        state["out"] = None
    if state["path"] is not None:
        state["path"].unlink(missing_ok=True)
