"""LoRA files of jobs: fetched once, kept by content hash.

``LoraCache(storage, root, limit).get(field, uri)`` returns a local path and the file's SHA-256:

* ``upload://`` and server-local files are used where they are (nothing is copied; ``Storage.fetch``
  refuses what the caller may not read);
* ``s3://`` and ``https://`` files are downloaded into ``root/<sha256>.safetensors``. Each URI
  remembers the hash and the object's version (S3 ETag + size, or the HEAD's ETag/Last-Modified +
  length); a later job with the same URI and version uses the kept file without downloading. Where
  no version can be read the file is downloaded again (and still stored once per content).

Files are written under a temporary name and renamed, and each URI's record is replaced atomically,
so several workers sharing ``data_dir`` at worst download the same file twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path

from multitalk.models.lora import file_sha256

from .storage import Storage

log = logging.getLogger(__name__)


class LoraCache:
    def __init__(self, storage: Storage, root: Path, limit: int):
        self.storage, self.root, self.limit = storage, Path(root), int(limit)
        self._lock = threading.Lock()
        self.downloads = 0  # files fetched over the network by this process

    def _record_path(self, uri: str) -> Path:
        return self.root / "uris" / f"{hashlib.sha256(uri.encode()).hexdigest()}.json"

    def get(self, field: str, uri: str) -> tuple[Path, str]:
        """``(local path, sha256)`` of the LoRA at ``uri`` (UserInputError / StorageError as ``Storage.fetch``)."""
        kind = self.storage.locate(field, uri).kind
        if kind in ("upload", "local", "output"):
            path = self.storage.fetch(field, uri, self.root / "incoming", limit=self.limit)
            return path, file_sha256(path)
        with self._lock:
            version = self.storage.version(field, uri)
            record_path = self._record_path(uri)
            if version is not None and record_path.is_file():
                try:
                    record = json.loads(record_path.read_text())
                except ValueError:
                    record = {}
                kept = self.root / f"{record.get('sha256')}.safetensors"
                if record.get("version") == version and kept.is_file():
                    log.info("LoRA %s: kept copy %s", uri, kept.name)
                    return kept, record["sha256"]
            incoming = self.root / "incoming" / uuid.uuid4().hex
            try:
                fetched = self.storage.fetch(field, uri, incoming, limit=self.limit)
                self.downloads += 1
                digest = file_sha256(fetched)
                kept = self.root / f"{digest}.safetensors"
                if not kept.is_file():
                    os.replace(fetched, kept)
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
            record_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = record_path.with_suffix(f".{uuid.uuid4().hex}.part")
            tmp.write_text(json.dumps({"uri": uri, "version": version, "sha256": digest}))
            os.replace(tmp, record_path)
            log.info("LoRA %s: downloaded, sha256 %s", uri, digest[:12])
            return kept, digest
