"""Outbound requests: one DNS answer is vetted and dialled (DNS rebinding), for downloads, each
redirect hop and webhooks; IPv6 forms of private IPv4 refused; TLS keeps the host's name.

Rebinding is played on loopback with two real servers on the same port: 127.0.0.1 stands for
the public internet, 127.0.0.2 for the server's own network (the address policy is narrowed to
refuse only 127.0.0.2). A resolver stub answers 127.0.0.1 the first time a name is looked up and
127.0.0.2 every time after, as a rebinding DNS server does. A plain httpx client shows that the
stub really rebinds (it reaches 127.0.0.2); the pinned paths never do.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from service_support import WEBHOOK_SECRET

from multitalk.errors import UserInputError
from multitalk.service import outbound
from multitalk.service.config import ServiceConfig
from multitalk.service.outbound import (AsyncPinnedTransport, ForbiddenDestination,
                                        PinnedTransport, forbidden_reason, parse_http_url, vet)
from multitalk.service.storage import Storage
from multitalk.service.webhook_delivery import WebhookDispatcher

PUBLIC, INTERNAL = "127.0.0.1", "127.0.0.2"
BODY = b"the public file"


class Site:
    """A real HTTP(S) server on ``ip:port`` that records connections and requests."""

    def __init__(self, ip: str, port: int, tls: ssl.SSLContext | None = None):
        self.connections, self.requests, self.sni = 0, [], []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                site.requests.append(("GET", self.path, self.headers["Host"]))
                if self.path == "/hop":          # redirect to another rebinding name
                    self.send_response(302)
                    self.send_header("Location", f"http://hop-target.test:{port}/file")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(BODY)))
                self.end_headers()
                self.wfile.write(BODY)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                site.requests.append(("POST", self.path, self.headers["Host"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        class Server(ThreadingHTTPServer):
            def verify_request(self, request, client_address):
                site.connections += 1
                return True

        self.server = Server((ip, port), Handler)
        if tls is not None:
            tls.sni_callback = lambda sock, name, ctx: site.sni.append(name)
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _port_free_on_both() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind((PUBLIC, 0))
            port = a.getsockname()[1]
            try:
                b.bind((INTERNAL, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free on both loopback addresses")


@pytest.fixture
def rebinding(monkeypatch):
    """Resolver stub (first answer PUBLIC, later INTERNAL) and a policy refusing INTERNAL."""
    real = socket.getaddrinfo
    lookups: dict[str, int] = {}

    def getaddrinfo(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if not name.endswith(".test"):
            return real(host, port, *args, **kwargs)
        lookups[name] = lookups.get(name, 0) + 1
        ip = PUBLIC if lookups[name] == 1 else INTERNAL
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port)))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(outbound, "forbidden_reason",
                        lambda ip: "internal" if str(ip) == INTERNAL else None)
    return lookups


@pytest.fixture
def sites():
    port = _port_free_on_both()
    public, internal = Site(PUBLIC, port), Site(INTERNAL, port)
    yield port, public, internal
    public.close()
    internal.close()


def test_the_stub_really_rebinds(rebinding, sites):
    """Without pinning, a check then a connection reach the internal server: the old hole."""
    port, public, internal = sites
    vet("cond_image", f"http://plain.test:{port}/file")                  # check: public
    httpx.get(f"http://plain.test:{port}/file", timeout=5)                # connect: rebound
    assert internal.connections == 1 and public.connections == 0


def test_download_and_each_redirect_hop_dial_the_vetted_address(rebinding, sites, tmp_path):
    port, public, internal = sites
    storage = Storage(ServiceConfig(data_dir=tmp_path / "data", download_timeout_s=5.0,
                                    download_retries=0))
    got = storage.fetch("cond_audio.person1", f"http://input.test:{port}/file", tmp_path / "in")
    assert got.read_bytes() == BODY
    got = storage.fetch("cond_image", f"http://redirect.test:{port}/hop", tmp_path / "in")
    assert got.read_bytes() == BODY
    assert internal.connections == 0
    assert [r[1:] for r in public.requests] == [
        ("/file", f"input.test:{port}"), ("/hop", f"redirect.test:{port}"),
        ("/file", f"hop-target.test:{port}")]                  # original Host on every hop
    assert rebinding == {"input.test": 1, "redirect.test": 1, "hop-target.test": 1}


def test_webhook_post_dials_the_vetted_address(rebinding, sites, tmp_path):
    port, public, internal = sites
    # the delivery worker's one attempt (vet + AsyncPinnedTransport)
    dispatcher = WebhookDispatcher(None, None, ServiceConfig(
        data_dir=tmp_path, webhook_secret=WEBHOOK_SECRET, webhook_timeout_s=5))
    sent = asyncio.run(dispatcher._post(f"http://hook.test:{port}/hook", "msg_1", b"{}"))
    assert sent == 204
    # the sync path (outbound.stream) and a plain AsyncClient on the pinned transport
    with outbound.stream("POST", f"http://sync-hook.test:{port}/hook", field="webhook_url",
                         content=b"{}", timeout=5) as r:
        assert r.status_code == 204

    async def post_async():
        dest = vet("webhook_url", f"http://async-hook.test:{port}/hook")
        async with httpx.AsyncClient(transport=AsyncPinnedTransport(dest), timeout=5) as c:
            return (await c.post(dest.url, content=b"{}")).status_code

    assert asyncio.run(post_async()) == 204
    assert internal.connections == 0
    assert public.requests == [("POST", "/hook", f"{name}.test:{port}")
                               for name in ("hook", "sync-hook", "async-hook")]


def test_a_pinned_transport_refuses_other_hosts(rebinding, sites):
    port, public, internal = sites
    dest = vet("webhook_url", f"http://one.test:{port}/")
    with httpx.Client(transport=PinnedTransport(dest)) as client:
        with pytest.raises(ForbiddenDestination):
            client.get(f"http://other.test:{port}/")
        with pytest.raises(ForbiddenDestination):
            client.get(f"http://one.test:{port + 1}/")
    assert public.connections == internal.connections == 0


def _certificate(name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return pem, key_pem


def test_https_keeps_sni_and_certificate_check_on_the_host_name(rebinding, tmp_path):
    cert, key = _certificate("tls.test")
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    port = _port_free_on_both()
    public, internal = Site(PUBLIC, port, tls=server_ctx), Site(INTERNAL, port)
    try:
        trust = ssl.create_default_context(cadata=cert.decode())
        with outbound.stream("GET", f"https://tls.test:{port}/file", field="cond_image",
                             timeout=5, verify=trust) as r:
            assert r.status_code == 200 and r.read() == BODY
        assert public.sni == ["tls.test"]                       # SNI is the name, not the IP
        assert public.requests == [("GET", "/file", f"tls.test:{port}")]
        assert internal.connections == 0
        # the certificate is checked against the name: one for another name is refused
        rebinding.clear()
        other = ssl.create_default_context(cadata=_certificate("else.test")[0].decode())
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            with outbound.stream("GET", f"https://tls.test:{port}/file", field="cond_image",
                                 timeout=5, verify=other):
                pass
    finally:
        public.close()
        internal.close()


@pytest.mark.parametrize("address, refused", [
    ("2002:7f00:1::1", True),            # 6to4 of 127.0.0.1
    ("2002:c0a8:101::1", True),          # 6to4 of 192.168.1.1
    ("2002:a9fe:a9fe::1", True),         # 6to4 of 169.254.169.254 (cloud metadata)
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", True),   # Teredo, client 127.0.0.1
    ("64:ff9b::7f00:1", True),           # NAT64 of 127.0.0.1
    ("64:ff9b::a00:1", True),            # NAT64 of 10.0.0.1
    ("64:ff9b:1::a9fe:a9fe", True),      # local-use NAT64 of 169.254.169.254
    ("::7f00:1", True),                  # IPv4-compatible 127.0.0.1
    ("::ffff:10.1.2.3", True),           # IPv4-mapped
    ("fd00::1", True), ("fe80::1", True), ("::1", True), ("100.64.0.1", True),
    ("2002:808:808::1", False),          # 6to4 of a public address
    ("64:ff9b::808:808", False),         # NAT64 of a public address
    ("2606:4700:4700::1111", False), ("8.8.8.8", False),
])
def test_forbidden_addresses_include_ipv6_wrappings_of_private_ipv4(address, refused):
    assert (forbidden_reason(ipaddress.ip_address(address)) is not None) == refused


def test_a_6to4_url_is_refused():
    with pytest.raises(UserInputError, match="6to4|non-public|wrapped"):
        vet("cond_image", "http://[2002:7f00:1::1]:8080/face.png")


@pytest.mark.parametrize("url", ["http://example.com:99999/x", "http://[::1", "http://[::1]x/",
                                 f"https://{'a' * 64}.example.com/x", "https://exa mple.com/x",
                                 "http:///x", "https://a..b/x"])
def test_malformed_urls_are_user_errors(url):
    with pytest.raises(UserInputError):
        parse_http_url("webhook_url", url)
