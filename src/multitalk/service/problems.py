"""The 422 body: one entry per problem, ``{loc, msg, type, fix}``, never the submitted value.

FastAPI's default answer echoes each offending ``input`` (a 50 MB string comes back whole);
these handlers build the documented shape from request validation errors and from
:class:`UserInputError` raised by the routes.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from multitalk.errors import UserInputError
from multitalk.pipeline.inputs import validation_fix

_FIXES = {
    "prompt": "a non-empty text of at most 10000 characters",
    "cond_image": "s3://bucket/key, https://..., or the uri from POST /v1/files",
    "cond_audio": "give {person1: uri} or {person1: uri, person2: uri}",
    "audio_type": "use add (one after the other) or para (simultaneous)",
    "bbox": "give {person1: [row_min, col_min, row_max, col_max], person2: [...]} in source "
            "pixels, finite and >= 0",
    "output": "use s3://bucket/prefix within this server's allowed locations, or leave it out",
    "webhook_url": "use a publicly reachable https:// URL",
}
_DEFAULT_FIX = "see the request schema at /openapi.json"


class InputProblems(Exception):
    """Several :class:`UserInputError` s of one request, answered together (one 422 entry each)."""

    def __init__(self, errors: list[UserInputError]):
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors
_PREFIXES = ("Value error, ", "Assertion failed, ")


def _fix(loc: list) -> str:
    fields = [str(p) for p in loc[1:]] if loc and loc[0] == "body" else [str(p) for p in loc]
    if fields[:1] == ["params"] and len(fields) > 1:
        return validation_fix(fields[1]) or _DEFAULT_FIX
    return _FIXES.get(fields[0] if fields else "", _DEFAULT_FIX)


def request_problems(exc: RequestValidationError) -> dict:
    detail = []
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        loc = list(err.get("loc", ()))
        if isinstance(cause, UserInputError):       # raised inside a validator: its own field
            inner = [int(p) if p.isdigit() else p for p in cause.field.split(".")]
            loc = loc + [p for p in inner if p not in loc]
            detail.append({"loc": loc, "msg": cause.message[:500], "type": "user_input",
                           "fix": cause.fix or _fix(loc)})
            continue
        msg = str(err.get("msg", "invalid value"))
        for prefix in _PREFIXES:
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        detail.append({"loc": loc, "msg": msg[:500], "type": err.get("type", "value_error"),
                       "fix": _fix(loc)})
    return {"detail": detail}


def user_problem(e: UserInputError) -> dict:
    loc = ["body", *[int(p) if p.isdigit() else p for p in e.field.split(".")]]
    return {"detail": [{"loc": loc, "msg": e.message[:500], "type": "user_input",
                        "fix": e.fix or _fix(loc)}]}


async def on_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content=request_problems(exc))


async def on_user_input(request: Request, exc: UserInputError) -> JSONResponse:
    return JSONResponse(status_code=422, content=user_problem(exc))


async def on_input_problems(request: Request, exc: InputProblems) -> JSONResponse:
    return JSONResponse(status_code=422, content={
        "detail": [user_problem(e)["detail"][0] for e in exc.errors]})
