"""HTTP request/response models (they are also the OpenAPI schema).

Input fields follow the official input json (``prompt``, ``cond_image``, ``cond_audio``,
``audio_type``, ``bbox``) with media given as URIs; ``params`` holds every generation option
under the names of ``generate_multitalk.py`` (defaults are the official ones).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multitalk.pipeline.inputs import GenerationParams

PERSONS = ("person1", "person2")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)   # NaN/Infinity: 422


# Every generation option, validated exactly as the CLI validates it (one definition).
__all__ = ["GenerationParams"]


class CondAudio(_Strict):
    person1: str = Field(..., min_length=1, max_length=4096)
    person2: str | None = Field(None, min_length=1, max_length=4096)


class BBoxes(_Strict):
    person1: list[float] = Field(..., min_length=4, max_length=4,
                                 description="[row_min, col_min, row_max, col_max] in source pixels (the official x/y order: x indexes rows)")
    person2: list[float] | None = Field(None, min_length=4, max_length=4)

    @field_validator("person1", "person2")
    @classmethod
    def _ordered(cls, v):
        if v is not None:
            x0, y0, x1, y1 = v
            if min(v) < 0 or x1 <= x0 or y1 <= y0:
                raise ValueError("bbox must be [x_min, y_min, x_max, y_max] with min < max, >= 0")
        return v


class JobRequest(_Strict):
    prompt: str = Field(..., min_length=1, max_length=10_000)
    cond_image: str = Field(..., min_length=1, max_length=4096,
                            description="s3://, https://, upload:// (from /v1/files) or a "
                                        "server-local path when the server allows it")
    cond_audio: CondAudio
    audio_type: Literal["add", "para"] | None = Field(
        None, description="two persons: 'add' (one after the other) or 'para' (together)")
    bbox: BBoxes | None = None
    params: GenerationParams = Field(default_factory=GenerationParams)
    output: str | None = Field(None, max_length=4096,
                               description="output URI prefix (s3://bucket/prefix); default: server's")
    webhook_url: str | None = Field(None, max_length=4096)

    @model_validator(mode="after")
    def _persons(self) -> "JobRequest":
        two = self.cond_audio.person2 is not None
        if two and self.audio_type is None:
            self.audio_type = "add"
        if self.bbox is not None and (self.bbox.person2 is not None) != two:
            raise ValueError("bbox must name exactly the persons of cond_audio")
        return self

    def media(self) -> dict[str, str]:
        """Field path -> URI of every input medium."""
        out = {"cond_image": self.cond_image, "cond_audio.person1": self.cond_audio.person1}
        if self.cond_audio.person2 is not None:
            out["cond_audio.person2"] = self.cond_audio.person2
        return out

    def set_media(self, uris: dict[str, str]) -> None:
        """Replace input URIs (field path -> URI, as :meth:`media` names them)."""
        for field, uri in uris.items():
            if field == "cond_image":
                self.cond_image = uri
            else:
                setattr(self.cond_audio, field.split(".", 1)[1], uri)

    def identity(self, payload: dict) -> dict:
        """What an Idempotency-Key is compared on: the dumped request, with a drawn random
        seed put back to -1 (a retry of a ``seed: -1`` body is the same request)."""
        if self.params.seed_drawn:
            payload = {**payload, "params": {**payload["params"], "seed": -1}}
        return payload


class Fraction(BaseModel):
    i: int
    n: int


class JobError(BaseModel):
    code: str
    message: str
    field: str | None = None
    hint: str | None = None


class JobResult(BaseModel):
    video_uri: str
    download_url: str | None = None
    frames: int
    duration_s: float
    width: int
    height: int
    seed: int


class Job(BaseModel):
    id: str
    owner: str | None = Field(None, description="the tenant (token name) the job belongs to")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float = 0.0
    stage: str | None = None
    clip: Fraction | None = None
    step: Fraction | None = None
    eta_s: float | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    cancel_requested: bool = False
    error: JobError | None = None
    result: JobResult | None = None
    output_deleted_at: float | None = Field(
        None, description="when retention deleted the video (the job stays)")
    webhook: dict | None = Field(
        None, description="delivery state: id (webhook-id), url, event, state (pending, "
                          "delivered, failed), attempts, status_code, error, next_attempt_at")
    request: dict | None = None


class JobList(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = None


class UploadedFile(BaseModel):
    uri: str
    size: int
    filename: str | None = None


class FieldProblem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str
    fix: str | None = None


class ValidationProblem(BaseModel):
    detail: list[FieldProblem]


_INTERNAL = ("seq", "lease_owner")


def job_document(job: dict, download_url: str | None) -> dict:
    """The public JSON of a stored job (GET /v1/jobs/{id}, webhooks)."""
    doc = {k: v for k, v in job.items() if k not in _INTERNAL}
    if doc.get("result"):
        doc["result"] = dict(doc["result"], download_url=download_url)
    return Job.model_validate(doc).model_dump(mode="json")
