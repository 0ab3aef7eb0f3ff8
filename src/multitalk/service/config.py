"""Service settings: one dataclass, filled from ``MULTITALK_*`` environment variables.

Every knob has a safe default; :meth:`ServiceConfig.from_env` reads the environment and keyword
overrides win over it (the CLI passes its options as overrides).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from multitalk.errors import UserInputError


def _bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ServiceConfig:
    data_dir: Path = Path("multitalk-data")
    api_tokens: tuple[str, ...] = ()          # empty: unauthenticated, loopback only
    webhook_secret: str = ""                  # HMAC key of X-MultiTalk-Signature
    output_prefix: str = ""                   # default output URI prefix; "" -> data_dir/outputs
    public_url: str = ""                      # base URL in download links; "" -> the request's
    allow_private_urls: bool = False          # permit loopback/private/link-local URLs (tests only)
    allow_local_paths: bool = False           # permit server-local input/output paths
    max_upload_bytes: int = 200 * 1024 * 1024
    max_download_bytes: int = 500 * 1024 * 1024
    max_lora_bytes: int = 4 * 1024 * 1024 * 1024  # a LoRA file (rank-128 14B LoRAs are ~1.2 GB)
    download_timeout_s: float = 60.0
    s3_endpoint_url: str | None = None        # S3-compatible stores (AWS_ENDPOINT_URL)
    presign_expiry_s: int = 3600
    lease_s: float = 60.0                     # a job whose lease is not renewed is re-queued
    heartbeat_s: float = 10.0
    max_attempts: int = 3                     # leases per job before "worker lost"
    poll_interval_s: float = 0.5              # idle worker sleep between queue polls
    upload_retries: int = 4
    upload_backoff_s: float = 1.0
    webhook_retries: int = 5
    webhook_backoff_s: float = 1.0
    webhook_timeout_s: float = 10.0
    keep_workdirs: bool = False               # keep each job's working folder after success

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
        values = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(values.get("api_tokens"), str):
            values["api_tokens"] = _tokens(values["api_tokens"])
        if "data_dir" in values:
            values["data_dir"] = Path(values["data_dir"])
        return replace(self, **values)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "ServiceConfig":
        """Defaults, then ``MULTITALK_<FIELD>`` variables, then ``overrides`` (None is ignored)."""
        env = dict(os.environ if env is None else env)
        values: dict = {}
        for f in fields(cls):
            raw = env.get(f"MULTITALK_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        if "s3_endpoint_url" not in values:
            values["s3_endpoint_url"] = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        return cls(**values).with_overrides(**overrides)


def _tokens(raw: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in raw.split(",") if t.strip())


def _parse(name: str, type_: str, raw: str):
    try:
        if name == "api_tokens":
            return _tokens(raw)
        if type_ == "bool":
            return _bool(raw)
        if type_ == "int":
            return int(raw)
        if type_ == "float":
            return float(raw)
        if type_ == "Path":
            return Path(raw)
        return raw
    except ValueError:
        raise UserInputError(f"MULTITALK_{name.upper()}", f"cannot parse {raw!r} as {type_}",
                             "fix the environment variable") from None


__all__ = ["ServiceConfig"]
