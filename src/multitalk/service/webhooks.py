"""Job webhooks: POST the job JSON, signed with HMAC-SHA256, retried with bounded backoff.

The receiver checks ``X-MultiTalk-Signature: sha256=<hex>`` with :func:`verify`. Delivery never
raises: the outcome is returned as a record that the worker stores on the job (``webhook``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time

import httpx

from multitalk.errors import UserInputError

from .outbound import stream

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MultiTalk-Signature"


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(sign(body, secret), header)


def deliver(url: str, payload: dict, *, secret: str, retries: int = 5, backoff_s: float = 1.0,
            timeout_s: float = 10.0, allow_private: bool = False) -> dict:
    """POST ``payload``; 2xx is success, anything else is retried ``retries`` times."""
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "multitalk-webhook/1",
               "X-MultiTalk-Event": f"job.{payload.get('status')}"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    record = {"url": url, "delivered": False, "attempts": 0, "status_code": None, "error": None}
    for attempt in range(retries + 1):
        record["attempts"] = attempt + 1
        try:
            # resolved once, refused if not public, connected to the vetted IP (outbound.py)
            with stream("POST", url, field="webhook_url", allow_private=allow_private,
                        timeout=timeout_s, content=body, headers=headers) as r:
                record["status_code"] = r.status_code
            if 200 <= r.status_code < 300:
                record.update(delivered=True, error=None, at=time.time())
                return record
            record["error"] = f"HTTP {r.status_code}"
        except UserInputError as e:
            record["error"] = str(e)
            break               # the address itself is refused: retrying cannot help
        except httpx.HTTPError as e:
            record["error"] = f"{type(e).__name__}: {e}"
        if attempt < retries:
            time.sleep(backoff_s * 2 ** attempt)
    record["at"] = time.time()
    log.warning("webhook to %s failed after %d attempts: %s", url, record["attempts"],
                record["error"])
    return record
