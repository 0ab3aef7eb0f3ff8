"""The page's backend over the HTTP API of ``multitalk serve`` (``multitalk ui --api URL --token T``).

Inputs are uploaded with ``POST /v1/files`` and the job submitted with ``POST /v1/jobs``; progress,
history and cancellation come from the service, and a finished video is fetched once from
``/v1/jobs/{id}/video`` (following a presigned redirect without the token) into a local cache the
page serves. A 422 or a failed job becomes the same one-line message as the CLI's
(``field: message (fix)``).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import httpx

from multitalk.errors import UserInputError
from multitalk.ui.jobs import JobView, error_line

log = logging.getLogger(__name__)


def problem_line(response: httpx.Response) -> str:
    """The first problem of a 422 answer, worded like the CLI (``field: message (fix)``)."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        return f"the service answered {response.status_code}: {response.text[:200]}"
    if isinstance(detail, str):
        return detail
    if not detail:
        return f"the service answered {response.status_code}"
    first = detail[0]
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    message = str(first.get("msg", "invalid value"))
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    field_name = ".".join(loc) or None
    if field_name and message.startswith((f"{field_name}: ", f"{field_name}.")):  # worded by UserInputError
        field_name = None
    return error_line(field_name, message, first.get("fix"))


def _check(response: httpx.Response, what: str) -> httpx.Response:
    if response.status_code == 422:
        raise ServiceProblem(problem_line(response))
    if response.status_code == 401:
        raise UserInputError("token", "the service refused the token", "pass --token with one of its API tokens")
    if response.status_code >= 400:
        raise UserInputError("api", f"{what}: the service answered {response.status_code} ({response.text[:200]})",
                             "check the service's log")
    return response


class ServiceProblem(UserInputError):
    """Bad input the service reported (422), already worded in full: shown as it is."""

    def __init__(self, line: str):
        super().__init__("request", line)
        self.args = (line,)

    def __str__(self) -> str:
        return self.args[0]


def job_view(doc: dict) -> JobView:
    """A service job document (``GET /v1/jobs/{id}``) as the page shows it."""
    err = doc.get("error")
    error = None
    if err:
        error = (error_line(err.get("field"), err.get("message", ""), err.get("hint"))
                 if err.get("code") == "bad_input" else
                 f"{err.get('code')}: {err.get('message', '')}" + (f" ({err['hint']})" if err.get("hint") else ""))
    result = doc.get("result") or {}
    request = doc.get("request") or {}
    audio = request.get("cond_audio") or {}
    tts = request.get("tts_audio") or {}
    speakers = 2 if audio.get("person2") or tts.get("human2_voice") else 1
    frac = lambda key: [doc[key]["i"], doc[key]["n"]] if doc.get(key) else None  # noqa: E731
    return JobView(id=doc["id"], status=doc["status"], created_at=doc["created_at"],
                   prompt=request.get("prompt", ""), stage=doc.get("stage"), progress=doc.get("progress") or 0.0,
                   clip=frac("clip"), step=frac("step"), eta_s=doc.get("eta_s"), started_at=doc.get("started_at"),
                   finished_at=doc.get("finished_at"), error=error, frames=result.get("frames"),
                   duration_s=result.get("duration_s"), width=result.get("width"), height=result.get("height"),
                   seed=result.get("seed"), speakers=speakers,
                   extra={"loras": [Path(str(lora.get("uri", ""))).name
                                    for lora in (request.get("params") or {}).get("loras") or []]})


class ApiJobs:
    """Jobs on a running ``multitalk serve`` (its job store, worker and history)."""

    kind = "api"

    def __init__(self, url: str, token: str | None = None, cache_dir: str | Path = "multitalk-ui",
                 timeout: float = 30.0, transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self.cache_dir = Path(cache_dir) / "videos"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._fetch_lock = threading.Lock()

    def _call(self, method: str, path: str, what: str, **kw) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise UserInputError("api", f"cannot reach the service at {self.url} ({type(exc).__name__})",
                                 "start it with multitalk serve, or check --api") from None
        return _check(response, what)

    # -- the page's interface ------------------------------------------------------------------
    def describe(self) -> str:
        return f"service at {self.url}"

    def status(self) -> str:
        try:
            r = self.client.get("/readyz")
        except httpx.HTTPError as exc:
            return f"the service at {self.url} cannot be reached ({type(exc).__name__})"
        if r.status_code == 401:
            return "the service refused the token (--token)"
        return "ready" if r.status_code == 200 else "the service is loading its models ..."

    def upload(self, path: str | Path) -> str:
        path = Path(path)
        with open(path, "rb") as f:
            r = self._call("POST", "/v1/files", f"uploading {path.name}", files={"file": (path.name, f)})
        return r.json()["uri"]

    def request_body(self, spec, params) -> dict:
        """The ``POST /v1/jobs`` body of a validated input, its media uploaded."""
        body = {"prompt": spec.prompt, "cond_image": self.upload(spec.cond_image),
                "cond_audio": {f"person{i + 1}": self.upload(p) for i, p in enumerate(spec.speaker_paths())},
                "audio_type": spec.audio_type, "params": params.model_dump(mode="json", exclude_defaults=True)}
        if spec.bbox_dict() is not None:
            body["bbox"] = spec.bbox_dict()
        return body

    def submit(self, spec, params) -> str:
        if not spec.prompt.strip():
            raise UserInputError("prompt", "empty", "describe the scene (the service needs a prompt)")
        return self._call("POST", "/v1/jobs", "submitting the job", json=self.request_body(spec, params)).json()["id"]

    def get(self, job_id: str) -> JobView:
        return job_view(self._call("GET", f"/v1/jobs/{job_id}", "reading the job").json())

    def history(self, limit: int = 50) -> list[JobView]:
        docs = self._call("GET", "/v1/jobs", "reading the history", params={"limit": limit}).json()["jobs"]
        return sorted((job_view(d) for d in docs), key=lambda j: j.created_at, reverse=True)

    def cancel(self, job_id: str) -> None:
        r = self.client.post(f"/v1/jobs/{job_id}/cancel")
        if r.status_code not in (200, 409):   # 409: it finished meanwhile
            _check(r, "cancelling the job")

    def video_path(self, job_id: str) -> Path | None:
        """The job's video, fetched once into the cache (None until it succeeded)."""
        if self.get(job_id).status != "succeeded":
            return None
        path = self.cache_dir / f"{job_id}.mp4"
        with self._fetch_lock:
            if not path.is_file():
                tmp = path.with_suffix(".part")
                # httpx drops the Authorization header when a redirect leaves the service's origin
                with self.client.stream("GET", f"/v1/jobs/{job_id}/video", follow_redirects=True) as r:
                    if r.status_code >= 400:
                        r.read()
                        _check(r, "downloading the video")
                    with open(tmp, "wb") as f:
                        for chunk in r.iter_bytes():
                            f.write(chunk)
                tmp.replace(path)
        return path

    def close(self) -> None:
        self.client.close()


__all__ = ["ApiJobs", "ServiceProblem", "job_view", "problem_line"]
