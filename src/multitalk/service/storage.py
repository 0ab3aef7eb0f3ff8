"""Inputs and outputs of jobs, through fsspec, inside the scope the server is configured with.

URI kinds (the scheme is case-insensitive; the canonical form is lower case):

* ``upload://<id>.<ext>``  a file sent to ``POST /v1/files`` (kept in ``data_dir/uploads``)
* ``output://<name>``      a video in the server's own output folder (``data_dir/outputs``): the
                           default output, shown without the server's paths
* ``s3://bucket/key``      S3-compatible stores (s3fs; AWS env vars, ``AWS_ENDPOINT_URL``), only
                           inside ``s3_allow`` (default: the s3:// ``output_prefix``)
* ``https://`` / ``http://`` downloads (size limit, timeout, retries), public addresses only,
                           each redirect hop vetted and the connection pinned (``outbound.py``)
* ``/abs/path``            server-local files, only under ``local_root`` after resolving symlinks

Every check raises :class:`UserInputError` naming the request field, so bad URIs are refused at
submission (HTTP 422). A location outside the scope gets the same answer as a missing one, so the
answers do not tell what exists there. Transfer failures raise :class:`StorageError` after retries
(tenacity).
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import fsspec
import httpx
from tenacity import (Retrying, retry_if_not_exception_type, stop_after_attempt,
                      wait_exponential)

from multitalk.errors import UserInputError

from .config import ServiceConfig
from .outbound import parse_http_url, stream, vet

log = logging.getLogger(__name__)

_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}(\.[a-z0-9]{1,8})?$")
_OUTPUT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_CHUNK = 1 << 20
_MAX_REDIRECTS = 3
# existence checks at submission run here with a hard time bound (s3fs retries on its own, so
# its timeouts alone do not bound a call); a store that does not answer in time is left to the worker
_PROBES = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="s3-probe")


class StorageError(Exception):
    """Reading or writing a storage location failed (after retries)."""


class TooLarge(Exception):
    """More bytes than allowed."""


def not_readable(field: str, uri: str) -> UserInputError:
    """The one answer for "missing" and "outside this server's scope" (no existence oracle)."""
    return UserInputError(field, f"{uri} does not exist or this server may not read it",
                          "check the location; this server reads only uploads, public URLs and "
                          "the locations it is configured for")


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``kind`` (upload, output, s3, http, local) and its canonical ``uri``."""

    kind: str
    uri: str
    bucket: str = ""
    key: str = ""
    path: Path | None = None


def _check_segments(field: str, key: str) -> None:
    segments = key.split("/")
    if ("\\" in key or "\x00" in key or not key
            or any(s in ("", ".", "..") for s in segments)):
        raise UserInputError(field, f"path {key!r} is not allowed (traversal or empty segment)",
                             "use a plain key without '..' or '//'")


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


class Storage:
    """Fetches job inputs, stores uploads and job outputs (local folder or s3://)."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        config.uploads_dir.mkdir(parents=True, exist_ok=True)
        config.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._scopes = self._s3_scopes()

    # -- filesystems --------------------------------------------------------------------------
    def s3(self, *, probe: bool = False):
        """The s3fs filesystem (credentials from the usual AWS variables); ``probe``: short
        timeouts and no retries, for checks made while a client waits."""
        if probe:
            t = self.config.probe_timeout_s
            cfg = {"retries": {"max_attempts": 1, "mode": "standard"},
                   "connect_timeout": t, "read_timeout": t}
        else:
            cfg = {"retries": {"max_attempts": 2, "mode": "standard"},
                   "connect_timeout": 5, "read_timeout": 60}
        kwargs = {"config_kwargs": cfg}
        if self.config.s3_endpoint_url:
            kwargs["endpoint_url"] = self.config.s3_endpoint_url
        return fsspec.filesystem("s3", **kwargs)

    # -- parsing (no I/O) ----------------------------------------------------------------------
    def locate(self, field: str, uri: str, *, prefix: bool = False) -> Location:
        """Parse ``uri`` (a prefix for outputs when ``prefix``); syntax problems are 422s."""
        scheme, sep, rest = uri.partition("://")
        scheme = scheme.lower() if sep else ""
        if scheme == "upload":
            if not _UPLOAD_ID.match(rest):
                raise UserInputError(field, f"{uri!r} is not an upload URI returned by /v1/files",
                                     "use the uri returned by POST /v1/files")
            return Location("upload", f"upload://{rest}", path=self.config.uploads_dir / rest)
        if scheme == "output":
            if prefix or not _OUTPUT_NAME.match(rest):
                raise UserInputError(field, f"{uri!r} is not a video of this server",
                                     "use s3://bucket/prefix, or leave output out")
            return Location("output", f"output://{rest}", path=self.config.outputs_dir / rest)
        if scheme == "s3":
            bucket, _, key = rest.partition("/")
            if not _BUCKET.match(bucket):
                raise UserInputError(field, f"invalid bucket name in {uri!r}",
                                     "use s3://bucket/key (bucket names are lower case)")
            key = key.rstrip("/") if prefix else key
            if key or not prefix:
                _check_segments(field, key)
            return Location("s3", f"s3://{bucket}/{key}" if key else f"s3://{bucket}",
                            bucket=bucket, key=key)
        if scheme in ("http", "https"):
            parse_http_url(field, uri)
            return Location("http", scheme + uri[len(scheme):])
        if scheme == "file" or (not sep and uri.startswith("/")):
            raw = rest if scheme == "file" else uri
            if self.config.local_root is None:
                raise UserInputError(field, f"server-local paths are not allowed ({uri!r})",
                                     "upload the file with POST /v1/files or use s3:// / "
                                     "https:// (local paths need MULTITALK_LOCAL_ROOT)")
            if not raw.startswith("/"):
                raise UserInputError(field, f"local path {raw!r} must be absolute",
                                     "use /abs/path")
            raw = raw.rstrip("/") if prefix else raw
            _check_segments(field, raw.lstrip("/"))
            return Location("local", raw, path=Path(raw))
        raise UserInputError(field, f"unsupported URI {uri!r}",
                             "use s3://bucket/key, https://..., or upload:// from POST /v1/files")

    def canonical(self, field: str, uri: str, *, prefix: bool = False) -> str:
        """``uri`` in its canonical form (what the job stores), or a UserInputError."""
        return self.locate(field, uri, prefix=prefix).uri

    # -- scope -----------------------------------------------------------------------------------
    def _s3_scopes(self) -> list[tuple[str, str]] | None:
        """``[(bucket, key prefix)]`` jobs may touch; None: any bucket (``s3_allow=*``)."""
        entries = list(self.config.s3_allow)
        if not entries and self.config.output_prefix.lower().startswith("s3://"):
            entries = [self.config.output_prefix]
        if "*" in entries:
            return None
        scopes = []
        for entry in entries:
            entry = entry[len("s3://"):] if entry.lower().startswith("s3://") else entry
            bucket, _, key = entry.strip("/").partition("/")
            scopes.append((bucket, key.strip("/")))
        return scopes

    def s3_in_scope(self, bucket: str, key: str) -> bool:
        if self._scopes is None:
            return True
        return any(bucket == b and (not p or key == p or key.startswith(p + "/"))
                   for b, p in self._scopes)

    def _local_root(self) -> Path | None:
        root = self.config.local_root
        return Path(root).resolve() if root is not None else None

    def _readable_local(self, field: str, loc: Location) -> Path:
        """The resolved path of a local input inside ``local_root`` (else "not readable")."""
        root = self._local_root()
        resolved = loc.path.resolve()          # symlinks resolved before the root check
        if root is None or not _under(resolved, root) or not resolved.is_file():
            raise not_readable(field, loc.uri)
        return resolved

    def _writable_local(self, loc: Location) -> Path:
        """The resolved destination of a local output inside ``local_root``, the configured
        local ``output_prefix`` or the server's output folder."""
        dest = loc.path.resolve()
        roots = [self.config.outputs_dir.resolve()]
        if self._local_root() is not None:
            roots.append(self._local_root())
        admin = self.config.output_prefix
        if admin and "://" not in admin:
            roots.append(Path(admin).resolve())
        if not any(_under(dest, r) for r in roots):
            raise StorageError(f"{loc.uri} is outside the folders this server may write")
        return dest

    # -- validation (at submission) ------------------------------------------------------------
    def check_input(self, field: str, uri: str) -> None:
        """Refuse a URI that the worker must not or cannot read (UserInputError)."""
        loc = self.locate(field, uri)
        if loc.kind in ("upload", "output"):
            if loc.kind == "output" or not loc.path.is_file():
                raise not_readable(field, loc.uri)
        elif loc.kind == "s3":
            if not self.s3_in_scope(loc.bucket, loc.key):
                raise not_readable(field, loc.uri)
            probe = _PROBES.submit(lambda: self.s3(probe=True).isfile(f"{loc.bucket}/{loc.key}"))
            try:
                exists = probe.result(timeout=self.config.probe_timeout_s)
            except (FileNotFoundError, PermissionError):
                exists = False
            except Exception as e:  # noqa: BLE001 - store slow or down: the worker checks again
                log.warning("cannot check %s now (%s); the worker will check it",
                            loc.uri, type(e).__name__)
                return
            if not exists:
                raise not_readable(field, loc.uri)
        elif loc.kind == "http":
            vet(field, loc.uri, allow_private=self.config.allow_private_urls)
        elif loc.kind == "local":
            self._readable_local(field, loc)

    def check_output(self, field: str, prefix: str) -> str:
        """Refuse an output prefix the server must not write; returns its canonical form."""
        loc = self.locate(field, prefix, prefix=True)
        if loc.kind == "s3":
            if not self.s3_in_scope(loc.bucket, loc.key + "/x" if loc.key else "x"):
                raise UserInputError(field, f"this server may not write to {loc.uri}",
                                     "use an output prefix of MULTITALK_S3_ALLOW, or leave "
                                     "output out")
        elif loc.kind == "local":
            root = self._local_root()
            if root is None or not _under(loc.path.resolve(), root):
                raise UserInputError(field, f"this server may not write to {loc.uri}",
                                     "use a folder under MULTITALK_LOCAL_ROOT")
        else:
            raise UserInputError(field, f"outputs can only go to s3:// or a local folder, not "
                                 f"{prefix!r}", "use s3://bucket/prefix")
        return loc.uri

    def local_input(self, field: str, uri: str) -> Path | None:
        """The local file of an input that needs no download (uploads, local paths), else None."""
        loc = self.locate(field, uri)
        if loc.kind == "upload":
            return loc.path if loc.path.is_file() else None
        if loc.kind == "local":
            return self._readable_local(field, loc)
        return None

    # -- uploads (POST /v1/files) ---------------------------------------------------------------
    def new_upload(self, filename: str | None) -> tuple[str, Path]:
        """A fresh ``(uri, path)`` for an uploaded file; the extension is kept (lower-case)."""
        ext = Path(filename or "").suffix.lower()
        if not re.fullmatch(r"\.[a-z0-9]{1,8}", ext):
            ext = ""
        name = uuid.uuid4().hex + ext
        return f"upload://{name}", self.config.uploads_dir / name

    # -- fetching (worker) -------------------------------------------------------------------
    def _retrying(self, attempts: int, backoff_s: float) -> Retrying:
        """Transient failures retried with exponential backoff; bad input is not retried."""
        return Retrying(stop=stop_after_attempt(max(1, attempts)),
                        wait=wait_exponential(multiplier=backoff_s, max=30),
                        retry=retry_if_not_exception_type((UserInputError, TooLarge)),
                        reraise=True,
                        before_sleep=lambda rs: log.warning(
                            "attempt %d failed (%s); retrying", rs.attempt_number,
                            rs.outcome.exception()))

    def fetch(self, field: str, uri: str, dest_dir: Path) -> Path:
        """Copy an input to ``dest_dir`` (streamed, size-limited) and return the local path."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        loc = self.locate(field, uri)
        limit = self.config.max_download_bytes
        if loc.kind in ("upload", "output"):
            if loc.kind == "output" or not loc.path.is_file():
                raise not_readable(field, loc.uri)
            return loc.path   # already local; read-only use
        if loc.kind == "local":
            return self._readable_local(field, loc)
        name = PurePosixPath(loc.key or httpx.URL(loc.uri).path).name or "input"
        dest = dest_dir / f"{field.replace('.', '_')}-{_safe_name(name)}"
        try:
            for attempt in self._retrying(self.config.download_retries + 1,
                                          self.config.upload_backoff_s):
                with attempt:
                    if loc.kind == "s3":
                        self._read_s3(field, loc, dest, limit)
                    else:
                        self._download(field, loc.uri, dest)
        except TooLarge:
            dest.unlink(missing_ok=True)
            raise UserInputError(field, f"{loc.uri} is larger than {limit} bytes",
                                 "use a smaller file") from None
        except UserInputError:
            dest.unlink(missing_ok=True)
            raise
        except Exception as e:  # noqa: BLE001 - transport problems become StorageError
            dest.unlink(missing_ok=True)
            raise StorageError(f"cannot read {loc.uri}: {type(e).__name__}: {e}") from e
        return dest

    def _read_s3(self, field: str, loc: Location, dest: Path, limit: int) -> None:
        if not self.s3_in_scope(loc.bucket, loc.key):
            raise not_readable(field, loc.uri)
        fs = self.s3()
        path = f"{loc.bucket}/{loc.key}"
        try:
            size = fs.size(path)
        except (FileNotFoundError, PermissionError):
            raise not_readable(field, loc.uri) from None
        if size > limit:
            raise UserInputError(field, f"{loc.uri} is {size} bytes (limit {limit})",
                                 "use a smaller file")
        with fs.open(path, "rb") as src, open(dest, "wb") as out:
            _copy_limited(src, out, limit)

    def _download(self, field: str, url: str, dest: Path) -> None:
        cfg = self.config
        timeout = httpx.Timeout(cfg.download_timeout_s, connect=min(10.0, cfg.download_timeout_s))
        deadline = time.monotonic() + cfg.download_timeout_s
        with stream("GET", url, field=field, allow_private=cfg.allow_private_urls,
                    timeout=timeout, max_redirects=_MAX_REDIRECTS) as r:
            if r.status_code in (401, 403, 404, 410):
                raise UserInputError(field, f"{url} answered {r.status_code}", "check the URL")
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

    # -- outputs -----------------------------------------------------------------------------
    def output_uri(self, prefix: str | None, name: str) -> str:
        prefix = prefix or self.config.output_prefix or "output://"
        if prefix.lower() == "output://":
            return "output://" + name
        return prefix.rstrip("/") + "/" + name

    def put_output(self, local: Path, uri: str) -> str:
        """Copy a finished file to ``uri``, retried with exponential backoff (StorageError)."""
        cfg = self.config
        loc = self.locate("output", uri)
        attempts = max(1, cfg.upload_retries + 1)
        if loc.kind == "s3" and not self.s3_in_scope(loc.bucket, loc.key):
            raise StorageError(f"{loc.uri} is outside the S3 locations this server may write")
        if loc.kind not in ("s3", "output", "local"):
            raise StorageError(f"outputs cannot be written to {loc.uri}")
        dest = self._writable_local(loc) if loc.kind != "s3" else None
        try:
            for attempt in self._retrying(attempts, cfg.upload_backoff_s):
                with attempt:
                    if loc.kind == "s3":
                        self.s3().put_file(str(local), f"{loc.bucket}/{loc.key}")
                    else:
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        tmp = dest.with_suffix(dest.suffix + ".part")
                        shutil.copyfile(local, tmp)
                        tmp.replace(dest)
        except Exception as e:  # noqa: BLE001
            raise StorageError(f"upload to {loc.uri} failed after {attempts} attempts: "
                               f"{type(e).__name__}: {e}") from e
        return loc.uri

    def presign(self, uri: str) -> str | None:
        """A time-limited download URL for an s3:// object; None for local files."""
        if not uri.lower().startswith("s3://"):
            return None
        loc = self.locate("video_uri", uri)
        return self.s3().sign(f"{loc.bucket}/{loc.key}", expiration=self.config.presign_expiry_s)

    def local_file(self, uri: str) -> Path | None:
        """The local path of a stored output (None for remote URIs or a file no longer there)."""
        if uri.lower().startswith("output://"):
            path = self.locate("video_uri", uri).path
        elif uri.startswith("/") or uri.lower().startswith("file://"):
            raw = uri[len("file://"):] if uri.lower().startswith("file://") else uri
            try:          # an absolute path: a job of an older version, or a local output prefix
                path = self._writable_local(Location("local", raw, path=Path(raw)))
            except StorageError:
                return None
        else:
            return None
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


def copy_stream_limited(src: BinaryIO, dest: Path, limit: int) -> int:
    """Stream ``src`` into ``dest``; raises TooLarge (and removes dest) past ``limit`` bytes."""
    try:
        with open(dest, "wb") as out:
            return _copy_limited(src, out, limit)
    except TooLarge:
        dest.unlink(missing_ok=True)
        raise
