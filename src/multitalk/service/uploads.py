"""``POST /v1/files``: the multipart field ``file`` streamed to disk, never held in memory.

The file is kept only when the multipart body is complete: its part ended and the closing
boundary arrived. A body cut short (client gone, truncated upload) or over the size limit leaves
nothing behind. (python-multipart's ``finalize`` does not check that the body was complete, so
the closing boundary is watched through its ``on_end`` callback.)
"""

from __future__ import annotations

from pathlib import Path

from fastapi import HTTPException, Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from multitalk.errors import UserInputError

from .storage import Storage

_DRAIN_FACTOR = 4           # read at most this many times the upload limit before hanging up
_CURL_HINT = "curl -F file=@audio.wav ..."


class _Receiver:
    """python-multipart callbacks writing the first ``file`` part to a new upload."""

    def __init__(self, storage: Storage, limit: int):
        self.storage, self.limit = storage, limit
        self.headers: dict[bytes, bytes] = {}
        self.field, self.value = b"", b""
        self.out = None
        self.uri: str | None = None
        self.path: Path | None = None
        self.filename: str | None = None
        self.size = 0
        self.seen = self.part_done = self.ended = self.too_big = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished,
                "on_part_data": self.on_part_data, "on_part_end": self.on_part_end,
                "on_end": self.on_end}

    def on_part_begin(self):
        self.headers = {}

    def on_header_field(self, data, start, end):
        self.field += data[start:end]

    def on_header_value(self, data, start, end):
        self.value += data[start:end]

    def on_header_end(self):
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def on_headers_finished(self):
        _, disp = parse_options_header(self.headers.get(b"content-disposition", b""))
        if disp.get(b"name") == b"file" and not self.seen:
            self.seen = True
            self.filename = disp.get(b"filename", b"").decode("utf-8", "replace") or None
            self.uri, self.path = self.storage.new_upload(self.filename)
            self.out = open(self.path, "wb")

    def on_part_data(self, data, start, end):
        if self.out is None or self.too_big:
            return
        self.size += end - start
        if self.size > self.limit:
            self.too_big = True
            return
        self.out.write(data[start:end])

    def on_part_end(self):
        if self.out is not None:
            self.out.close()
            self.out = None
            self.part_done = True

    def on_end(self):
        self.ended = True

    def discard(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


async def receive_upload(request: Request, storage: Storage, limit: int) -> dict:
    """Store the ``file`` field of a multipart body; returns ``{uri, size, filename}``."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise UserInputError("file", "expected multipart/form-data with a 'file' field",
                             _CURL_HINT)
    rx = _Receiver(storage, limit)
    parser = MultipartParser(params[b"boundary"], rx.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > _DRAIN_FACTOR * limit + (1 << 20):
                rx.too_big = True
                break
            if not rx.too_big:
                parser.write(chunk)        # past the limit: drain without parsing
        if not rx.too_big:
            parser.finalize()
    except ClientDisconnect:
        rx.discard()
        raise HTTPException(400, "the upload was interrupted; nothing was stored") from None
    except Exception as e:  # malformed multipart
        rx.discard()
        raise UserInputError("file", f"malformed multipart body ({e})", "send one 'file' field"
                             ) from None
    if rx.too_big:
        rx.discard()
        raise HTTPException(413, f"file larger than {limit} bytes")
    if not rx.seen:
        raise UserInputError("file", "no 'file' field in the form", _CURL_HINT)
    if not (rx.part_done and rx.ended):
        rx.discard()
        raise UserInputError("file", "the multipart body ended before its closing boundary: "
                             "the upload is incomplete and was not stored", "send it again")
    return {"uri": rx.uri, "size": rx.size, "filename": rx.filename}
