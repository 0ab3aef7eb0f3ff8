"""Service settings: one pydantic-settings class, filled from ``MULTITALK_*`` environment variables.

Every knob has a safe default. ``ServiceConfig()`` reads ``MULTITALK_<FIELD>`` for every field
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for ``s3_endpoint_url`` when its own variable is
unset); keyword arguments win over the environment (the CLI passes its options that way), and
:meth:`ServiceConfig.with_overrides` returns a re-validated copy. A value that does not parse is
a :class:`UserInputError` naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from multitalk.errors import UserInputError

ENV_PREFIX = "MULTITALK_"


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore",
                                      populate_by_name=True, validate_default=True)

    data_dir: Path = Path("multitalk-data")
    # empty: unauthenticated, loopback only
    api_tokens: Annotated[tuple[str, ...], NoDecode] = ()
    webhook_secret: str = ""                  # HMAC key of X-MultiTalk-Signature
    output_prefix: str = ""                   # default output URI prefix; "" -> data_dir/outputs
    public_url: str = ""                      # base URL in download links; "" -> the request's
    allow_private_urls: bool = False          # permit loopback/private/link-local URLs (tests only)
    max_upload_bytes: int = Field(200 * 1024 * 1024, ge=0)
    max_download_bytes: int = Field(500 * 1024 * 1024, ge=0)
    download_timeout_s: float = Field(60.0, gt=0)
    s3_endpoint_url: str | None = Field(None, validation_alias=AliasChoices(
        "s3_endpoint_url", f"{ENV_PREFIX}S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL"))                  # S3-compatible stores
    presign_expiry_s: int = Field(3600, gt=0)
    lease_s: float = Field(60.0, gt=0)        # a job whose lease is not renewed is re-queued
    heartbeat_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1)        # leases per job before "worker lost"
    poll_interval_s: float = Field(0.5, gt=0)  # idle worker sleep between queue polls
    upload_retries: int = Field(4, ge=0)
    upload_backoff_s: float = Field(1.0, ge=0)
    webhook_retries: int = Field(5, ge=0)
    webhook_backoff_s: float = Field(1.0, ge=0)
    webhook_timeout_s: float = Field(10.0, gt=0)
    keep_workdirs: bool = False               # keep each job's working folder after success

    # -- what a request may reach and how big a job may be (README "Security model", "Limits")
    # S3 locations jobs may read and write: "bucket" or "bucket/prefix", comma-separated; "*" is
    # any bucket; empty: only the s3:// output_prefix (no S3 at all without one)
    s3_allow: Annotated[tuple[str, ...], NoDecode] = ()
    local_root: Path | None = None            # server-local paths allowed only under this folder
    download_retries: int = Field(2, ge=0)    # transient download failures retried (tenacity)
    probe_timeout_s: float = Field(5.0, gt=0)  # S3 existence check at submission; then deferred
    max_body_bytes: int = Field(1024 * 1024, ge=1024)   # request bodies other than uploads
    limit_frames: int = Field(1000, ge=5)     # frame_num, and frames of a streaming job
    limit_audio_s: float = Field(300.0, gt=0)  # speech length (both speakers in 'add' mode)
    limit_resolution: int = Field(720, ge=120)  # largest size: 720, 480 (120: preview only)
    limit_steps: int = Field(100, ge=1)       # sample_steps
    job_deadline_s: float = Field(3600.0, gt=0)  # a job running longer fails with 'timeout'
    docs: Literal["public", "token", "off"] = "token"   # /docs, /openapi.json access

    @field_validator("api_tokens", "s3_allow", mode="before")
    @classmethod
    def _split_tokens(cls, value):
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "jobs.sqlite3"

    @property
    def uploads_dir(self) -> Path:
        return Path(self.data_dir) / "uploads"

    @property
    def outputs_dir(self) -> Path:
        return Path(self.data_dir) / "outputs"

    @property
    def work_dir(self) -> Path:
        return Path(self.data_dir) / "work"

    @property
    def authenticated(self) -> bool:
        return bool(self.api_tokens)

    def with_overrides(self, **overrides) -> "ServiceConfig":
        """A validated copy with ``overrides`` applied (None values are ignored)."""
        values = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(values) - set(type(self).model_fields)
        if unknown:
            raise TypeError(f"unknown service settings: {sorted(unknown)}")
        return _build(type(self), {**self.model_dump(), **values})

    @classmethod
    def from_env(cls, **overrides) -> "ServiceConfig":
        """Defaults, then ``MULTITALK_<FIELD>`` variables, then ``overrides`` (None is ignored)."""
        return _build(cls, {k: v for k, v in overrides.items() if v is not None})


def _build(cls: type[ServiceConfig], values: dict) -> ServiceConfig:
    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "settings"
        if not name.isupper():
            name = f"{ENV_PREFIX}{name.upper()}"
        raise UserInputError(name, err["msg"], "fix the environment variable or option"
                             ) from None


__all__ = ["ServiceConfig"]
