"""Service settings: one pydantic-settings class, filled from ``MULTITALK_*`` environment variables.

Every knob has a safe default. ``ServiceConfig()`` reads ``MULTITALK_<FIELD>`` for every field
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for ``s3_endpoint_url`` when its own variable is
unset); keyword arguments win over the environment (the CLI passes its options that way), and
:meth:`ServiceConfig.with_overrides` returns a re-validated copy. A value that does not parse is
a :class:`UserInputError` naming the variable.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from multitalk.errors import UserInputError

ENV_PREFIX = "MULTITALK_"
DEFAULT_TENANT = "default"
WEBHOOK_SECRET_PREFIX = "whsec_"
NEW_SECRET_HINT = ("python -c \"import base64,secrets; print('whsec_' + "
                   "base64.b64encode(secrets.token_bytes(32)).decode())\"")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_CSV = Annotated[tuple[str, ...], NoDecode]


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore",
                                      populate_by_name=True, validate_default=True)

    data_dir: Path = Path("multitalk-data")
    # the job store: "" -> SQLite file data_dir/jobs.sqlite3; sqlite:///path; postgresql://...
    db: str = ""
    # "name:token,..." (a bare token belongs to the tenant "default"); empty: unauthenticated,
    # loopback only. admin_tokens: the same form; an admin sees and cancels every tenant's jobs
    api_tokens: _CSV = ()
    admin_tokens: _CSV = ()
    queue_quota: int = Field(0, ge=0)         # queued + running jobs per tenant; 0: unlimited
    queue_quotas: _CSV = ()                   # "name:N,...": per-tenant quotas over queue_quota
    # Standard Webhooks signing secret (whsec_<base64>); webhooks are refused while it is empty
    webhook_secret: str = ""
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
    webhook_retries: int = Field(5, ge=0)     # attempts after the first
    webhook_backoff_s: float = Field(1.0, ge=0)        # first retry delay (doubles, jittered)
    webhook_max_backoff_s: float = Field(300.0, ge=0)
    webhook_timeout_s: float = Field(10.0, gt=0)       # whole attempt: connect, send, status
    webhook_concurrency: int = Field(8, ge=1)          # deliveries in flight per process
    keep_workdirs: bool = False               # keep each job's working folder after success
    # retention in days (0: keep forever): uploads, job outputs, finished job rows
    upload_retention_days: float = Field(0.0, ge=0)
    output_retention_days: float = Field(0.0, ge=0)
    job_retention_days: float = Field(0.0, ge=0)
    retention_interval_s: float = Field(3600.0, gt=0)  # how often each process sweeps
    # prometheus_client multiprocess folder; "" -> data_dir/metrics (PROMETHEUS_MULTIPROC_DIR
    # wins when set)
    metrics_dir: str = ""

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

    @field_validator("api_tokens", "admin_tokens", "queue_quotas", "s3_allow", mode="before")
    @classmethod
    def _split_csv(cls, value):
        if isinstance(value, str):
            return tuple(t.strip() for t in value.split(",") if t.strip())
        return value

    @field_validator("api_tokens", "admin_tokens")
    @classmethod
    def _named_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            name, token = _split_entry(entry)
            if not _NAME.match(name):
                raise ValueError(f"tenant name {name!r} must be 1-64 letters, digits, '_.@-'")
            if len(token) < 8:
                raise ValueError(f"the token of tenant {name!r} is shorter than 8 characters")
        return value

    @field_validator("queue_quotas")
    @classmethod
    def _quotas(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            name, _, n = entry.rpartition(":")
            if not name or not n.strip().isdigit():
                raise ValueError(f"{entry!r} is not name:N")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _standard_secret(cls, value: str) -> str:
        if value:
            webhook_key(value)
        return value

    @model_validator(mode="after")
    def _unique_tokens(self) -> "ServiceConfig":
        tokens = [_split_entry(e)[1] for e in self.api_tokens + self.admin_tokens]
        if len(tokens) != len(set(tokens)):
            raise ValueError("the same token is given twice (tokens must be unique)")
        return self

    # -- tenants -------------------------------------------------------------------------------
    def principals(self) -> dict[str, tuple[str, bool]]:
        """token -> (tenant name, is admin)."""
        out = {_split_entry(e)[1]: (_split_entry(e)[0], False) for e in self.api_tokens}
        out.update({_split_entry(e)[1]: (_split_entry(e)[0], True) for e in self.admin_tokens})
        return out

    def quota_for(self, tenant: str) -> int:
        for entry in self.queue_quotas:
            name, _, n = entry.rpartition(":")
            if name.strip() == tenant:
                return int(n)
        return self.queue_quota

    @property
    def webhooks_enabled(self) -> bool:
        return bool(self.webhook_secret)

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "jobs.sqlite3"

    @property
    def db_url(self) -> str:
        """Where the job store is: ``db`` or the SQLite file under ``data_dir``."""
        return self.db or f"sqlite:///{self.db_path}"

    @property
    def metrics_path(self) -> Path:
        return Path(self.metrics_dir) if self.metrics_dir else Path(self.data_dir) / "metrics"

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
        return bool(self.api_tokens or self.admin_tokens)

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


def _split_entry(entry: str) -> tuple[str, str]:
    """``name:token`` -> (name, token); a bare token belongs to the default tenant."""
    name, sep, token = entry.partition(":")
    if not sep:
        return DEFAULT_TENANT, entry.strip()
    return name.strip(), token.strip()


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret ``whsec_<base64>`` (ValueError if malformed)."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"must be a Standard Webhooks secret: {WEBHOOK_SECRET_PREFIX}<base64 of "
                         f"24-64 random bytes>; make one with {NEW_SECRET_HINT}")
    try:
        key = base64.b64decode(secret[len(WEBHOOK_SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {WEBHOOK_SECRET_PREFIX} is not base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"the key is {len(key)} bytes; use 24 to 64 random bytes")
    return key


def _build(cls: type[ServiceConfig], values: dict) -> ServiceConfig:
    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "api_tokens"   # model check: tokens
        if not name.isupper():
            name = f"{ENV_PREFIX}{name.upper()}"
        raise UserInputError(name, err["msg"], "fix the environment variable or option"
                             ) from None


__all__ = ["ServiceConfig"]
