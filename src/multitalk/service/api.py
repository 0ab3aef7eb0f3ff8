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
import math
from pathlib import Path
from typing import Annotated, Callable, Literal

from fastapi import BackgroundTasks, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from python_multipart.multipart import MultipartParser, parse_options_header

import multitalk
from multitalk.errors import UserInputError

from .config import ServiceConfig
from .metrics import Metrics
from .schemas import Job, JobList, JobRequest, UploadedFile, ValidationProblem, job_document
from .storage import Storage, check_public_url
from .store import IdempotencyConflict, JobStore
from .worker import download_url, send_webhook

log = logging.getLogger(__name__)

_DRAIN_FACTOR = 4           # read at most this many times the upload limit before hanging up


def create_app(config: ServiceConfig, *, store: JobStore | None = None,
               storage: Storage | None = None, metrics: Metrics | None = None,
               ready: Callable[[], bool] | None = None,
               check_lora: Callable[[str, Path], None] | None = None) -> FastAPI:
    """The FastAPI app. ``ready`` reports whether models are loaded (None: always ready).

    ``check_lora(field, path)`` checks a LoRA file already on the server (upload or local path)
    against the model at submission (a bad one is a 422); remote ones are checked by the worker.
    """
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
                  description="Audio-driven multi-person talking video generation (job API).")
    app.state.store, app.state.storage, app.state.metrics = store, storage, metrics
    auth = [Depends(authorize)]
    problem = {422: {"model": ValidationProblem, "description": "field-level input problems"}}

    @app.exception_handler(UserInputError)
    async def _user_input(request: Request, e: UserInputError):
        return JSONResponse(status_code=422, content=_problem(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        # FastAPI's own handler echoes the input, and a NaN/Infinity literal in the body (which
        # Python's JSON parser accepts) cannot be written back as JSON: a 500 instead of the 422
        return JSONResponse(status_code=422, content={"detail": _finite(jsonable_encoder(e.errors()))})

    def doc(request: Request, job: dict) -> dict:
        return job_document(job, download_url(storage, config, job, str(request.base_url)))

    def get_job(job_id: str) -> dict:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict:
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
        for field, uri in body.media().items():
            storage.check_input(field, uri)
        if check_lora is not None:
            for field, uri in body.lora_files().items():
                local = storage.local_input(field, uri)
                if local is not None:
                    check_lora(field, local)
        if body.output:
            storage.check_output("output", body.output)
        if body.webhook_url:
            check_public_url("webhook_url", body.webhook_url,
                             allow_private=config.allow_private_urls)
        payload = body.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
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
        return await _receive_upload(request, storage, config.max_upload_bytes)

    return app


def _finite(value):
    """``value`` with every non-finite float written as a string (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


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
