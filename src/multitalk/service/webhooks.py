"""Job webhooks in the Standard Webhooks format (https://www.standardwebhooks.com).

Each notification is a POST of ``{"type": "job.<status>", "timestamp": <ISO 8601>, "data": <the
job document>}`` with three headers:

* ``webhook-id``: the message id (``msg_...``), the same on every retry of one notification;
* ``webhook-timestamp``: integer seconds since the epoch of this attempt;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the
  base64-decoded part of the ``whsec_...`` secret.

Any Standard Webhooks verifier checks them (the ``standardwebhooks`` package, svix, ...);
:func:`verify` is this project's own, for receivers written in Python. A receiver rejects a
timestamp more than ``tolerance_s`` (5 minutes) away from its clock, so a captured request cannot
be replayed later.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import datetime, timezone

from .config import webhook_key

TOLERANCE_S = 300


class WebhookVerificationError(Exception):
    """A notification whose headers are missing, too old or too new, or not signed by us."""


def body(event: str, job_document: dict, at: float) -> bytes:
    """The exact bytes POSTed (compact JSON)."""
    payload = {"type": event,
               "timestamp": datetime.fromtimestamp(at, timezone.utc).isoformat(),
               "data": job_document}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def signature(secret: str, msg_id: str, timestamp: int, data: bytes) -> str:
    mac = hmac.new(webhook_key(secret), f"{msg_id}.{timestamp}.".encode() + data, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(secret: str, msg_id: str, data: bytes, *, now: float | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one delivery attempt."""
    ts = int(time.time() if now is None else now)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": signature(secret, msg_id, ts, data),
            "content-type": "application/json", "user-agent": "multitalk-webhook/2"}


def verify(secret: str, data: bytes, received: dict[str, str], *,
           tolerance_s: float = TOLERANCE_S, now: float | None = None) -> dict:
    """Check a received notification; returns the parsed payload or raises
    :class:`WebhookVerificationError`."""
    h = {k.lower(): v for k, v in received.items()}
    msg_id, ts, sigs = h.get("webhook-id"), h.get("webhook-timestamp"), h.get("webhook-signature")
    if not (msg_id and ts and sigs):
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or "
                                       "webhook-signature")
    try:
        stamp = int(ts)
    except ValueError:
        raise WebhookVerificationError(f"bad webhook-timestamp {ts!r}") from None
    now = time.time() if now is None else now
    if abs(now - stamp) > tolerance_s:
        raise WebhookVerificationError(f"timestamp {stamp} is more than {tolerance_s:.0f} s "
                                       "from now (replayed or clock skew)")
    expected = signature(secret, msg_id, stamp, data).encode()
    if not any(hmac.compare_digest(expected, s.encode()) for s in sigs.split()):
        raise WebhookVerificationError("no matching signature")
    return json.loads(data)
