"""Outbound HTTP that cannot be steered into the server's own network (SSRF, DNS rebinding).

:func:`vet` parses a URL, resolves its host ONCE and refuses loopback, private, link-local,
multicast, reserved and shared addresses, including IPv6 forms that wrap such an IPv4 address
(IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible ``::a.b.c.d``, 6to4 ``2002:AABB:CCDD::``, Teredo
``2001::/32``, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``). It returns a :class:`Destination`
that names the vetted address.

:class:`PinnedTransport` (and :class:`AsyncPinnedTransport`) send a request to that address and no
other: the request keeps its URL, its ``Host`` header and, for https, its TLS server name (SNI and
certificate check against the original host, through httpcore's ``sni_hostname`` extension), while
the TCP connection goes to ``Destination.ip``. No second DNS lookup happens, so a DNS answer that
changes after the check (rebinding) cannot redirect the connection. A request for any other host
through a pinned transport is refused.

:func:`stream` is what downloads and webhooks use: one request (its body not read), redirects
followed by hand with every hop vetted and pinned again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from multitalk.errors import UserInputError

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_FIX = "use a publicly reachable https:// URL"


class ForbiddenDestination(httpx.TransportError):
    """A pinned transport was asked to connect somewhere it was not vetted for."""


@dataclass(frozen=True)
class Destination:
    """A vetted URL: ``host`` (ASCII/IDNA form, lower case), ``port`` and the one ``ip`` to
    dial."""

    url: str
    scheme: str
    host: str
    port: int
    ip: str


def forbidden_reason(ip: _IP) -> str | None:
    """Why a connection to ``ip`` is refused, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        elif ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        elif ip.teredo is not None:
            embedded.extend(ip.teredo)          # (server, client): both must be public
        elif any(ip in net for net in _NAT64):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        elif ip in _IPV4_COMPATIBLE:
            return "an IPv4-compatible IPv6 address (deprecated)"
        for inner in embedded:
            reason = forbidden_reason(inner)
            if reason:
                return f"{reason}, wrapped in {ip}"
        if embedded:
            return None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    # not is_global covers private, shared (100.64/10), documentation, benchmarking, reserved ...
    if ip.is_private or ip.is_reserved or not ip.is_global:
        return "private or reserved"
    return None


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the system resolver's preference order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    seen: list[str] = []
    for info in infos:
        addr = info[4][0].split("%")[0]
        if addr not in seen:
            seen.append(addr)
    return seen


def parse_http_url(field: str, url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an http(s) URL; any malformed URL is a UserInputError."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = parts.hostname
        port = parts.port
    except ValueError as e:                  # "http://[::1", port 99999, ...
        raise UserInputError(field, f"malformed URL ({e})", "check the URL") from None
    if scheme not in ("http", "https"):
        raise UserInputError(field, f"URL scheme {scheme or '(none)'!r} is not allowed",
                             "use an https:// URL")
    if not host:
        raise UserInputError(field, "the URL has no host", "use https://host/path")
    if parts.username or parts.password:
        raise UserInputError(field, "credentials in URLs are not accepted",
                             "use a presigned URL instead")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise UserInputError(field, "the URL contains whitespace or control characters",
                             "percent-encode the URL")
    try:
        raw_host = httpx.URL(url).raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, ValueError, UnicodeError) as e:
        raise UserInputError(field, f"malformed URL ({e})", "check the URL") from None
    try:
        ipaddress.ip_address(raw_host)
    except ValueError:
        labels = raw_host.rstrip(".").split(".")
        if len(raw_host) > 253 or not all(0 < len(label) <= 63 for label in labels):
            raise UserInputError(field, "the host name is not a valid DNS name (a label is "
                                 "empty or longer than 63 characters, or the name is longer "
                                 "than 253)", "check the URL") from None
    return scheme, raw_host, port or (443 if scheme == "https" else 80)


def vet(field: str, url: str, *, allow_private: bool = False) -> Destination:
    """Parse, resolve once and check ``url``; the returned destination is what gets dialled.

    ``allow_private`` (tests, trusted networks) skips the address check but still pins.
    """
    scheme, host, port = parse_http_url(field, url)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError):
            raise UserInputError(field, f"host {host!r} does not resolve", "check the URL"
                                 ) from None
    if not addresses:
        raise UserInputError(field, f"host {host!r} does not resolve", "check the URL")
    if not allow_private:
        for addr in addresses:       # every answer must be public: no mixing in a private one
            reason = forbidden_reason(ipaddress.ip_address(addr))
            if reason:
                raise UserInputError(field, f"host {host!r} resolves to a non-public address "
                                     f"({addr}: {reason})", _FIX)
    return Destination(url=url, scheme=scheme, host=host, port=port, ip=addresses[0])


def _pin(dest: Destination, request: httpx.Request) -> None:
    url = request.url
    if (url.scheme, url.raw_host.decode("ascii").lower(), url.port or (443 if url.scheme == "https" else 80)) != (
            dest.scheme, dest.host, dest.port):
        raise ForbiddenDestination(f"this transport is pinned to {dest.scheme}://{dest.host}:"
                                   f"{dest.port}, not {url.scheme}://{url.host}", request=request)
    # Host header stays (httpx set it from the original URL); the socket goes to the vetted IP
    request.url = url.copy_with(host=dest.ip)
    if dest.scheme == "https":
        request.extensions = {**request.extensions, "sni_hostname": dest.host}


class PinnedTransport(httpx.BaseTransport):
    """An httpx transport that dials ``dest.ip`` for requests to ``dest``'s host, nothing else."""

    def __init__(self, dest: Destination, *, verify=True, **transport_options):
        self.dest = dest
        self._inner = httpx.HTTPTransport(verify=verify, trust_env=False, **transport_options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _pin(self.dest, request)
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


class AsyncPinnedTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`PinnedTransport`."""

    def __init__(self, dest: Destination, *, verify=True, **transport_options):
        self.dest = dest
        self._inner = httpx.AsyncHTTPTransport(verify=verify, trust_env=False,
                                               **transport_options)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _pin(self.dest, request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@contextmanager
def stream(method: str, url: str, *, field: str, allow_private: bool = False,
           timeout: httpx.Timeout | float = 10.0, max_redirects: int = 0, verify=True,
           **request_options) -> Iterator[httpx.Response]:
    """Send one request to a vetted, pinned address and yield the response unread.

    With ``max_redirects`` > 0, 3xx answers are followed by hand (each hop vetted and pinned);
    more hops than that is a UserInputError. With 0 a 3xx is returned like any other answer.
    Address problems raise UserInputError; transport problems raise httpx errors.
    """
    for _hop in range(max_redirects + 1):
        dest = vet(field, url, allow_private=allow_private)
        with httpx.Client(transport=PinnedTransport(dest, verify=verify), timeout=timeout,
                          trust_env=False, follow_redirects=False) as client:
            with client.stream(method, url, **request_options) as response:
                if max_redirects and response.is_redirect:
                    url = urljoin(url, response.headers["location"])
                    continue
                yield response
                return
    raise UserInputError(field, f"more than {max_redirects} redirects", "use the final URL")


__all__ = ["AsyncPinnedTransport", "Destination", "ForbiddenDestination", "PinnedTransport",
           "forbidden_reason", "parse_http_url", "resolve", "stream", "vet"]
