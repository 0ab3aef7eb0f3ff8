"""Request body cap, enforced before anything parses or authenticates the request (ASGI).

A request whose ``Content-Length`` is over the route's limit is answered 413 at once, its body
never read. A body without a length (chunked) or longer than it declared is counted while it
streams: past the limit the client gets 413 and the app sees a disconnect (an upload in progress
removes its partial file). Uploads get ``max_upload_bytes`` plus room for the multipart framing;
every other route gets ``max_body_bytes``.

Written by hand because neither Starlette nor uvicorn offers a body limit (uvicorn's
``h11_max_incomplete_event_size`` bounds headers only).
"""

from __future__ import annotations

import json
from collections.abc import Callable

MULTIPART_SLACK = 64 * 1024      # headers and boundaries of a one-file multipart form


class BodyLimit:
    """ASGI middleware: ``limit_for(scope)`` is the byte limit of one request."""

    def __init__(self, app, limit_for: Callable[[dict], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _reject(send, limit)
        state = {"received": 0, "answered": False, "started": False}

        async def counted_receive():
            if state["answered"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    if not state["started"]:
                        state["answered"] = True
                        await _reject(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["answered"]:
                return                      # the 413 went out; the app's answer is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, counted_receive, guarded_send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _reject(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
