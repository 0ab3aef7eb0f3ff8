"""Inputs and outputs of jobs, through fsspec.

URI kinds:

* ``upload://<id>.<ext>``  a file sent to ``POST /v1/files`` (kept in ``data_dir/uploads``)
* ``s3://bucket/key``      any S3-compatible store (s3fs; AWS env vars, ``AWS_ENDPOINT_URL``)
* ``https://`` / ``http://`` downloads (size limit, timeout), public addresses only
* ``/abs/path``            server-local files, only when ``allow_local_paths``

Every check raises :class:`UserInputError` naming the request field, so bad URIs are refused at
submission (HTTP 422). Transfer failures raise :class:`StorageError`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import shutil
import socket
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import fsspec
import httpx

from multitalk.errors import UserInputError

from .config import ServiceConfig

log = logging.getLogger(__name__)

_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}(\.[a-z0-9]{1,8})?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CHUNK = 1 << 20
_MAX_REDIRECTS = 3


class StorageError(Exception):
    """Reading or writing a storage location failed (after retries)."""


class TooLarge(Exception):
    """More bytes than allowed."""


# -- URL safety ---------------------------------------------------------------------------------
def _forbidden_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # not is_global covers private, loopback, link-local, shared (100.64/10), reserved, ...
    return (not ip.is_global or ip.is_private or ip.is_loopback or ip.is_link_local
            or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def check_public_url(field: str, url: str, *, allow_private: bool) -> None:
    """Refuse non-http(s) URLs and hosts resolving to loopback/private/link-local addresses."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UserInputError(field, f"URL scheme {parts.scheme or '(none)'!r} is not allowed",
                             "use an https:// URL")
    if not parts.hostname:
        raise UserInputError(field, f"URL {url!r} has no host", "use https://host/path")
    if parts.username or parts.password:
        raise UserInputError(field, "credentials in URLs are not accepted",
                             "use a presigned URL instead")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        raise UserInputError(field, f"host {parts.hostname!r} does not resolve",
                             "check the URL") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if _forbidden_ip(ip):
            raise UserInputError(field, f"host {parts.hostname!r} resolves to a non-public "
                                 f"address ({ip})", "use a publicly reachable URL")


def _check_key(field: str, key: str) -> None:
    parts = PurePosixPath(key).parts
    if "\\" in key or "\x00" in key or any(p in ("..", ".") for p in key.split("/")) or not parts:
        raise UserInputError(field, f"path {key!r} is not allowed (traversal or empty segment)",
                             "use a plain key without '..'")


class Storage:
    """Fetches job inputs, stores uploads and job outputs (local folder or s3://)."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        config.uploads_dir.mkdir(parents=True, exist_ok=True)
        config.outputs_dir.mkdir(parents=True, exist_ok=True)

    # -- filesystems --------------------------------------------------------------------------
    def s3(self):
        """The s3fs filesystem (credentials from the usual AWS variables)."""
        kwargs = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                                    "connect_timeout": 5, "read_timeout": 60}}
        if self.config.s3_endpoint_url:
            kwargs["endpoint_url"] = self.config.s3_endpoint_url
        return fsspec.filesystem("s3", **kwargs)

    # -- validation (at submission) ------------------------------------------------------------
    def check_input(self, field: str, uri: str) -> None:
        """Refuse a URI that the worker must not or cannot read (UserInputError)."""
        kind = self._kind(field, uri)
        if kind == "upload":
            if not self._upload_path(field, uri).is_file():
                raise UserInputError(field, f"upload {uri!r} does not exist",
                                     "upload the file with POST /v1/files first")
        elif kind == "s3":
            bucket, key = self._s3_parts(field, uri)
            try:
                exists = self.s3().isfile(f"{bucket}/{key}")
            except Exception as e:  # noqa: BLE001 - any transport error: can't check now
                log.warning("cannot check %s now (%s); the worker will retry", uri, e)
                return
            if not exists:
                raise UserInputError(field, f"{uri} does not exist", "check bucket and key")
        elif kind == "http":
            check_public_url(field, uri, allow_private=self.config.allow_private_urls)
        elif kind == "local":
            path = self._local_path(field, uri)
            if not path.is_file():
                raise UserInputError(field, f"{path} is not a file", "check the path")

    def check_output(self, field: str, prefix: str) -> None:
        kind = self._kind(field, prefix)
        if kind == "s3":
            bucket, key = self._s3_parts(field, prefix.rstrip("/") + "/x")
        elif kind == "local":
            self._local_path(field, prefix, must_exist=False)
        else:
            raise UserInputError(field, f"outputs can only go to s3:// or a local folder, not "
                                 f"{prefix!r}", "use s3://bucket/prefix")

    def _kind(self, field: str, uri: str) -> str:
        scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
        if scheme == "upload":
            return "upload"
        if scheme == "s3":
            return "s3"
        if scheme in ("http", "https"):
            return "http"
        if scheme == "file" or (not scheme and uri.startswith("/")):
            if not self.config.allow_local_paths:
                raise UserInputError(field, f"server-local paths are not allowed ({uri!r})",
                                     "upload the file with POST /v1/files or use s3:// / https://")
            return "local"
        raise UserInputError(field, f"unsupported URI {uri!r}",
                             "use s3://bucket/key, https://..., or upload:// from POST /v1/files")

    def _upload_path(self, field: str, uri: str) -> Path:
        name = uri[len("upload://"):]
        if not _UPLOAD_ID.match(name):
            raise UserInputError(field, f"{uri!r} is not an upload URI returned by /v1/files",
                                 "use the uri returned by POST /v1/files")
        return self.config.uploads_dir / name

    def _s3_parts(self, field: str, uri: str) -> tuple[str, str]:
        rest = uri[len("s3://"):]
        bucket, _, key = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise UserInputError(field, f"invalid bucket name in {uri!r}", "use s3://bucket/key")
        if key:
            _check_key(field, key)
        return bucket, key

    def _local_path(self, field: str, uri: str, must_exist: bool = True) -> Path:
        raw = uri[len("file://"):] if uri.startswith("file://") else uri
        if not raw.startswith("/"):
            raise UserInputError(field, f"local path {raw!r} must be absolute", "use /abs/path")
        _check_key(field, raw.lstrip("/"))
        return Path(raw)

    # -- uploads (POST /v1/files) ---------------------------------------------------------------
    def new_upload(self, filename: str | None) -> tuple[str, Path]:
        """A fresh ``(uri, path)`` for an uploaded file; the extension is kept (lower-case)."""
        ext = Path(filename or "").suffix.lower()
        if not re.fullmatch(r"\.[a-z0-9]{1,8}", ext):
            ext = ""
        name = uuid.uuid4().hex + ext
        return f"upload://{name}", self.config.uploads_dir / name

    # -- fetching (worker) -------------------------------------------------------------------
    def fetch(self, field: str, uri: str, dest_dir: Path) -> Path:
        """Copy an input to ``dest_dir`` (streamed, size-limited) and return the local path."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        kind = self._kind(field, uri)
        limit = self.config.max_download_bytes
        if kind == "upload":
            src = self._upload_path(field, uri)
            if not src.is_file():
                raise UserInputError(field, f"upload {uri!r} no longer exists", "upload it again")
            return src   # already local; read-only use
        if kind == "local":
            path = self._local_path(field, uri)
            if not path.is_file():
                raise UserInputError(field, f"{path} is not a file", "check the path")
            return path
        name = PurePosixPath(urlsplit(uri).path).name or "input"
        dest = dest_dir / f"{field.replace('.', '_')}-{_safe_name(name)}"
        try:
            if kind == "s3":
                bucket, key = self._s3_parts(field, uri)
                fs = self.s3()
                try:
                    size = fs.size(f"{bucket}/{key}")
                except FileNotFoundError:
                    raise UserInputError(field, f"{uri} does not exist", "check bucket and key"
                                         ) from None
                if size > limit:
                    raise UserInputError(field, f"{uri} is {size} bytes (limit {limit})",
                                         "use a smaller file")
                with fs.open(f"{bucket}/{key}", "rb") as src, open(dest, "wb") as out:
                    _copy_limited(src, out, limit)
            else:
                self._download(field, uri, dest)
        except TooLarge:
            dest.unlink(missing_ok=True)
            raise UserInputError(field, f"{uri} is larger than {limit} bytes",
                                 "use a smaller file") from None
        except UserInputError:
            dest.unlink(missing_ok=True)
            raise
        except Exception as e:  # noqa: BLE001 - transport problems become StorageError
            dest.unlink(missing_ok=True)
            raise StorageError(f"cannot read {uri}: {type(e).__name__}: {e}") from e
        return dest

    def _download(self, field: str, url: str, dest: Path) -> None:
        cfg = self.config
        timeout = httpx.Timeout(cfg.download_timeout_s, connect=min(10.0, cfg.download_timeout_s))
        deadline = time.monotonic() + cfg.download_timeout_s
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            for _ in range(_MAX_REDIRECTS + 1):
                check_public_url(field, url, allow_private=cfg.allow_private_urls)
                with client.stream("GET", url) as r:
                    if r.is_redirect:
                        url = urljoin(url, r.headers["location"])
                        continue
                    if r.status_code == 404:
                        raise UserInputError(field, f"{url} answered 404", "check the URL")
                    r.raise_for_status()
                    length = int(r.headers.get("content-length") or 0)
                    if length > cfg.max_download_bytes:
                        raise TooLarge()
                    with open(dest, "wb") as out:
                        n = 0
                        for chunk in r.iter_bytes(_CHUNK):
                            n += len(chunk)
                            if n > cfg.max_download_bytes:
                                raise TooLarge()
                            if time.monotonic() > deadline:
                                raise StorageError(f"download of {url} exceeded "
                                                   f"{cfg.download_timeout_s}s")
                            out.write(chunk)
                    return
        raise UserInputError(field, f"too many redirects for {url}", "use the final URL")

    # -- outputs -----------------------------------------------------------------------------
    def output_uri(self, prefix: str | None, name: str) -> str:
        prefix = prefix or self.config.output_prefix or str(self.config.outputs_dir.resolve())
        return prefix.rstrip("/") + "/" + name

    def put_output(self, local: Path, uri: str) -> str:
        """Copy a finished file to ``uri``, retried with exponential backoff (StorageError)."""
        cfg = self.config
        attempts = max(1, cfg.upload_retries + 1)
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                if uri.startswith("s3://"):
                    self.s3().put_file(str(local), uri[len("s3://"):])
                else:
                    dest = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    tmp = dest.with_suffix(dest.suffix + ".part")
                    shutil.copyfile(local, tmp)
                    tmp.replace(dest)
                return uri
            except Exception as e:  # noqa: BLE001
                last = e
                log.warning("upload of %s to %s failed (attempt %d/%d): %s", local, uri,
                            attempt + 1, attempts, e)
                if attempt + 1 < attempts:
                    time.sleep(cfg.upload_backoff_s * 2 ** attempt)
        raise StorageError(f"upload to {uri} failed after {attempts} attempts: "
                           f"{type(last).__name__}: {last}")

    def presign(self, uri: str) -> str | None:
        """A time-limited download URL for an s3:// object; None for local files."""
        if not uri.startswith("s3://"):
            return None
        return self.s3().sign(uri[len("s3://"):], expiration=self.config.presign_expiry_s)

    def local_file(self, uri: str) -> Path | None:
        """The local path of a stored output (None for remote URIs)."""
        if uri.startswith("s3://") or "://" in uri and not uri.startswith("file://"):
            return None
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
        return path if path.is_file() else None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[-80:] or "input"


def _copy_limited(src: BinaryIO, out: BinaryIO, limit: int) -> int:
    n = 0
    while chunk := src.read(_CHUNK):
        n += len(chunk)
        if n > limit:
            raise TooLarge()
        out.write(chunk)
    return n
