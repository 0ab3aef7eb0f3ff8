"""``service.lora_cache.LoraCache``: LoRA files of jobs fetched once and kept by content hash.

Real S3 (moto, through s3fs) and a real HTTP server on loopback serving files with
``Last-Modified`` (Python's ``SimpleHTTPRequestHandler``, which also answers HEAD).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from multitalk.errors import UserInputError
from multitalk.service.config import ServiceConfig
from multitalk.service.lora_cache import LoraCache
from multitalk.service.storage import Storage


def _cache(tmp_path, **kw) -> LoraCache:
    cfg = ServiceConfig(data_dir=tmp_path / "data").with_overrides(allow_private_urls=True, **kw)
    return LoraCache(Storage(cfg), cfg.data_dir / "loras", cfg.max_lora_bytes)


def test_s3_lora_fetched_once_and_again_when_it_changes(tmp_path, moto):
    cache = _cache(tmp_path, s3_endpoint_url=moto.endpoint, s3_allow=("inputs",))
    fs = moto.fs()
    fs.pipe("inputs/style.safetensors", b"first version")
    path, digest = cache.get("params.loras.0.uri", "s3://inputs/style.safetensors")
    assert digest == hashlib.sha256(b"first version").hexdigest() and path.name == f"{digest}.safetensors"
    assert path.read_bytes() == b"first version" and cache.downloads == 1
    again, digest2 = cache.get("params.loras.0.uri", "s3://inputs/style.safetensors")
    assert (again, digest2, cache.downloads) == (path, digest, 1)        # the kept copy, no download
    fs.pipe("inputs/copy.safetensors", b"first version")               # same content, another URI
    other, digest3 = cache.get("params.loras.0.uri", "s3://inputs/copy.safetensors")
    assert (other, digest3, cache.downloads) == (path, digest, 2)        # stored once per content
    fs.pipe("inputs/style.safetensors", b"second version")             # new ETag: fetched again
    newer, digest4 = cache.get("params.loras.0.uri", "s3://inputs/style.safetensors")
    assert digest4 == hashlib.sha256(b"second version").hexdigest() and cache.downloads == 3
    assert newer.read_bytes() == b"second version" and path.read_bytes() == b"first version"
    with pytest.raises(UserInputError, match="does not exist"):
        cache.get("params.loras.1.uri", "s3://inputs/missing.safetensors")
    assert not list((cache.root / "incoming").glob("*/*"))              # no partial files left


@pytest.fixture
def http_dir(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_https_lora_fetched_once_and_size_limited(tmp_path, http_dir):
    folder, base = http_dir
    (folder / "a.safetensors").write_bytes(b"x" * 100)
    cache = _cache(tmp_path, max_lora_bytes=150)
    path, digest = cache.get("params.loras.0.uri", f"{base}/a.safetensors")
    assert cache.get("params.loras.0.uri", f"{base}/a.safetensors") == (path, digest)
    assert cache.downloads == 1
    (folder / "a.safetensors").write_bytes(b"y" * 120)                 # another length: another version
    _, changed = cache.get("params.loras.0.uri", f"{base}/a.safetensors")
    assert changed == hashlib.sha256(b"y" * 120).hexdigest() and cache.downloads == 2
    (folder / "big.safetensors").write_bytes(b"z" * 151)
    with pytest.raises(UserInputError, match="larger than 150 bytes"):
        cache.get("params.loras.1.uri", f"{base}/big.safetensors")


def test_uploads_are_used_in_place(tmp_path):
    cache = _cache(tmp_path)
    uri, path = cache.storage.new_upload("style.safetensors")
    path.write_bytes(b"uploaded")
    got, digest = cache.get("params.loras.0.uri", uri)
    assert got == path and digest == hashlib.sha256(b"uploaded").hexdigest() and cache.downloads == 0
