"""Storage: http(s) downloads (redirects, size limit, timeout), s3 reads, outputs, URL safety."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from multitalk.errors import UserInputError
from multitalk.service.config import ServiceConfig
from multitalk.service.outbound import vet
from multitalk.service.storage import Storage, StorageError

PAYLOAD = bytes(range(256)) * 64          # 16 KiB


class _Handler(BaseHTTPRequestHandler):
    flaky_calls = 0

    def do_GET(self):
        if self.path == "/flaky.wav":                # 503 once, then the file
            type(self).flaky_calls += 1
            code = 503 if type(self).flaky_calls == 1 else 200
            self._send(code, PAYLOAD if code == 200 else b"", length=True)
        elif self.path == "/ok.wav":
            self._send(200, PAYLOAD, length=True)
        elif self.path == "/unsized.wav":          # no Content-Length: counted while streaming
            self._send(200, PAYLOAD * 4, length=False)
        elif self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", "/ok.wav")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow.wav":
            time.sleep(2.0)
            self._send(200, PAYLOAD, length=True)
        else:
            self._send(404, b"", length=True)

    def _send(self, code, body, length):
        self.send_response(code)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _storage(tmp_path, **kw) -> Storage:
    cfg = ServiceConfig(data_dir=tmp_path / "data").with_overrides(
        **{"allow_private_urls": True, "download_timeout_s": 1.0, **kw})
    return Storage(cfg)


def test_http_download_follows_redirects_and_limits_size(tmp_path, http_base):
    st = _storage(tmp_path, max_download_bytes=len(PAYLOAD) * 2)
    dest = tmp_path / "in"
    assert st.fetch("cond_image", f"{http_base}/ok.wav", dest).read_bytes() == PAYLOAD
    assert st.fetch("cond_image", f"{http_base}/hop", dest).read_bytes() == PAYLOAD
    with pytest.raises(UserInputError, match="larger than"):
        st.fetch("cond_audio.person1", f"{http_base}/unsized.wav", dest)
    with pytest.raises(UserInputError, match="404"):
        st.fetch("cond_image", f"{http_base}/missing.wav", dest)
    with pytest.raises(UserInputError, match="redirects"):
        st.fetch("cond_image", f"{http_base}/loop", dest)
    # a transient failure is retried (tenacity), a timeout ends the attempt at the limit
    assert st.fetch("cond_image", f"{http_base}/flaky.wav", dest).read_bytes() == PAYLOAD
    assert _Handler.flaky_calls == 2
    once = _storage(tmp_path, max_download_bytes=len(PAYLOAD) * 2, download_retries=0)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="Timeout"):
        once.fetch("cond_image", f"{http_base}/slow.wav", dest)
    assert time.monotonic() - t0 < 1.9
    # the two successful downloads stay; every failed one was removed
    assert sorted(p.name for p in dest.iterdir()) == ["cond_image-flaky.wav", "cond_image-hop",
                                                      "cond_image-ok.wav"]


def test_private_addresses_refused_unless_allowed(tmp_path, http_base):
    st = _storage(tmp_path, allow_private_urls=False)
    with pytest.raises(UserInputError, match="non-public"):
        st.fetch("cond_image", f"{http_base}/ok.wav", tmp_path / "in")
    for url in ("http://0.0.0.0/x", "http://[::ffff:127.0.0.1]/x", "http://192.168.1.2/x",
                "http://100.64.0.1/x", "gopher://example.com/x", "http://user:pw@example.com/x"):
        with pytest.raises(UserInputError):
            vet("webhook_url", url, allow_private=False)


def test_s3_read_write_and_presign(tmp_path, moto):
    st = _storage(tmp_path, s3_endpoint_url=moto.endpoint, max_download_bytes=len(PAYLOAD),
                  s3_allow=("inputs", "outputs"))
    moto.fs().pipe("inputs/a/b.wav", PAYLOAD)
    moto.fs().pipe("inputs/big.wav", PAYLOAD + b"x")
    got = st.fetch("cond_audio.person1", "s3://inputs/a/b.wav", tmp_path / "in")
    assert got.read_bytes() == PAYLOAD
    with pytest.raises(UserInputError, match="does not exist or this server may not read"):
        st.fetch("cond_image", "s3://inputs/nope.png", tmp_path / "in")
    with pytest.raises(UserInputError, match="bytes"):
        st.fetch("cond_image", "s3://inputs/big.wav", tmp_path / "in")
    st.check_input("cond_image", "s3://inputs/a/b.wav")
    with pytest.raises(UserInputError, match="does not exist or this server may not read"):
        st.check_input("cond_image", "s3://inputs/a/c.wav")
    uri = st.output_uri("s3://outputs/x/", "job.mp4")
    assert uri == "s3://outputs/x/job.mp4"
    assert st.put_output(got, uri) == uri
    assert moto.fs().cat("outputs/x/job.mp4") == PAYLOAD
    assert st.presign(uri).startswith(moto.endpoint + "/outputs/x/job.mp4?")


def test_local_outputs_and_uploads(tmp_path):
    st = _storage(tmp_path)
    src = tmp_path / "v.mp4"
    src.write_bytes(PAYLOAD)
    uri = st.output_uri(None, "j.mp4")
    assert uri == "output://j.mp4"                    # no server path in the job
    st.put_output(src, uri)
    assert (tmp_path / "data" / "outputs" / "j.mp4").read_bytes() == PAYLOAD
    assert st.local_file(uri).read_bytes() == PAYLOAD and st.presign(uri) is None
    up_uri, up_path = st.new_upload("../../evil name.WAV")
    assert up_uri.startswith("upload://") and up_path.parent == st.config.uploads_dir
    assert up_path.suffix == ".wav"
