"""The download link of a finished job (job documents, webhooks)."""

from __future__ import annotations

import logging

from .config import ServiceConfig
from .storage import Storage

log = logging.getLogger(__name__)


def download_url(storage: Storage, config: ServiceConfig, job: dict,
                 base_url: str | None = None) -> str | None:
    """Presigned URL for s3 outputs, else the service's ``/v1/jobs/{id}/video`` route."""
    result = job.get("result")
    if not result or job.get("output_deleted_at"):
        return None
    try:
        signed = storage.presign(result["video_uri"])
    except Exception as e:  # noqa: BLE001 - storage down: no link rather than no job
        log.warning("cannot presign %s: %s", result["video_uri"], e)
        return None
    if signed:
        return signed
    base = (base_url or config.public_url or "").rstrip("/")
    return f"{base}/v1/jobs/{job['id']}/video"
