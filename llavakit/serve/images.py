"""`image_url` values -> image bytes: `data:` URLs always; local files and http(s) only when enabled.

Every failure is an `ImageURLError` whose message names the request field at fault.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse


class ImageURLError(ValueError):
    """An image reference the server will not or cannot use (HTTP 400)."""


@dataclass(frozen=True)
class ImageSources:
    """Where images may come from, and how big they may be."""

    max_bytes: int = 10 * 2**20
    local_dir: Path | None = None
    """Serve `file://` URLs and plain paths from under this dir only; None disables them."""
    allow_remote: bool = False
    remote_timeout_s: float = 10.0
    """httpx's limit for each operation of a remote fetch (connect, each read, ...): catches a server gone silent."""
    remote_total_timeout_s: float = 30.0
    """Limit on a whole remote fetch (DNS, connect, redirects, headers, body): catches a server that trickles bytes."""
    remote_hosts: tuple[str, ...] = ()
    """Allow-list of host names / IP literals for remote fetches (exact, case-insensitive match of the URL's host,
    redirects included). Empty (the default): any host whose every address is globally routable; hosts resolving
    to a loopback, private, link-local, reserved, multicast or unspecified address are refused. Non-empty: only
    these hosts, whatever their addresses (an explicitly listed host is trusted)."""

    def __post_init__(self):
        for name in ("remote_timeout_s", "remote_total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ImageSources.{name} must be > 0, not {getattr(self, name)!r}")
        if isinstance(self.remote_hosts, str):
            raise ValueError(f"ImageSources.remote_hosts must be a tuple of host names, not the string "
                             f"{self.remote_hosts!r}")
        object.__setattr__(self, "remote_hosts", tuple(normalise_host(h) for h in self.remote_hosts))


def normalise_host(host: str) -> str:
    """A bare host name or IP literal, lower-cased (IPv6 without brackets); ValueError naming the value otherwise."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"remote image host must be a non-empty host name or IP literal, not {host!r}")
    bare = host.strip().lower()
    bracketed = bare.startswith("[") and bare.endswith("]")
    ip = _ip_literal(bare[1:-1] if bracketed else bare)
    if ip is not None and (ip.version == 6 or not bracketed):
        return str(ip)
    if any(c in bare for c in "/\\:?#@[]") or any(c.isspace() for c in bare):
        raise ValueError(f"remote image host {host!r} must be a bare host name or IP literal "
                         "(no scheme, port or path), e.g. 'images.example.com' or '10.0.0.5'")
    return bare


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address if it is one, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_data_url(url: str, where: str, max_bytes: int) -> bytes:
    """Bytes of a base64 `data:` URL."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ImageURLError(f"{where}: malformed data URL (no ',')")
    if not header.endswith(";base64"):
        raise ImageURLError(f"{where}: data URL must be base64-encoded ('data:image/png;base64,...')")
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise ImageURLError(f"{where}: image is larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageURLError(f"{where}: invalid base64 in data URL ({exc})") from None


def read_local(url: str, where: str, sources: ImageSources) -> tuple[bytes, str]:
    if sources.local_dir is None:
        raise ImageURLError(f"{where}: local image paths are disabled (start the server with --local-images-dir DIR)")
    raw = unquote(urlparse(url).path) if url.startswith("file://") else url
    try:
        return _read_inside(sources.local_dir.resolve(), raw, where, sources.max_bytes), raw
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long, no permission, ...
        if isinstance(exc, ImageURLError):
            raise
        raise ImageURLError(f"{where}: cannot read image file {raw!r}: {exc}") from None


def _read_inside(root: Path, raw: str, where: str, max_bytes: int) -> bytes:
    path = (root / raw).resolve()
    if not path.is_relative_to(root):
        raise ImageURLError(f"{where}: {raw!r} is outside the allowed image dir")
    if not path.is_file():
        raise ImageURLError(f"{where}: image file {raw!r} not found")
    if path.stat().st_size > max_bytes:
        raise ImageURLError(f"{where}: {raw!r} is larger than the limit of {max_bytes} bytes")
    return path.read_bytes()


async def fetch_remote(url: str, where: str, sources: ImageSources) -> bytes:
    """GET an http(s) URL with a total time limit and a byte cap (streamed, so a huge or endless body is cut off).

    The total limit (`remote_total_timeout_s`) bounds the whole fetch: the remaining time is checked between body
    chunks, each httpx operation gets at most `min(remote_timeout_s, total)`, and the whole fetch runs under an
    asyncio timeout as a backstop (a server dripping header bytes never reaches the body loop).
    """
    import asyncio
    import time

    if not sources.allow_remote:
        raise ImageURLError(f"{where}: remote image URLs are disabled (start the server with --allow-remote-images)")
    limit = sources.remote_total_timeout_s
    deadline = time.monotonic() + limit
    try:
        return await asyncio.wait_for(_fetch(url, where, sources, deadline), timeout=limit)
    except asyncio.TimeoutError:
        raise _too_slow(url, where, limit) from None


def _too_slow(url: str, where: str, limit: float) -> ImageURLError:
    return ImageURLError(f"{where}: fetching {url} took longer than the total time limit of {limit:g} s "
                         "(--remote-total-timeout)")


MAX_REDIRECTS = 3
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


async def _fetch(url: str, where: str, sources: ImageSources, deadline: float) -> bytes:
    """GET `url`, following at most MAX_REDIRECTS redirects by hand so each new host is checked before connecting.

    Residual risk: DNS rebinding. `_check_host` resolves a name, then httpx resolves it again when it connects;
    a host whose DNS answers a public address the first time and a private one the second slips through. Pinning
    the checked address would close that, but https needs the name for SNI and certificates, so it is not done.
    """
    import httpx

    timeout = httpx.Timeout(min(sources.remote_timeout_s, sources.remote_total_timeout_s))
    current, came_from = _parse_url(url, where), ""
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                await _check_host(current, where, sources, came_from)
                async with client.stream("GET", current) as resp:
                    if resp.status_code not in REDIRECT_STATUSES:
                        if resp.status_code != 200:
                            raise ImageURLError(f"{where}: fetching {current}{came_from} returned HTTP "
                                                f"{resp.status_code}")
                        return await _read_capped(resp, url, where, sources, deadline)
                    current, came_from = _redirect_target(resp, current, where), f" (redirected from {current})"
    except httpx.HTTPError as exc:
        raise ImageURLError(f"{where}: could not fetch {url}: {type(exc).__name__}: {exc}") from None
    raise ImageURLError(f"{where}: fetching {url} gave too many redirects (more than {MAX_REDIRECTS}); "
                        f"the last pointed to {current}")


def _http_url(make, invalid: str, not_http: str):
    """`make()` (an httpx.URL) if it is an http(s) URL with a host; else ImageURLError `invalid: <why>` / `not_http`."""
    import httpx

    try:
        url = make()
    except httpx.InvalidURL as exc:
        raise ImageURLError(f"{invalid}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ImageURLError(not_http)
    return url


def _parse_url(url: str, where: str):
    """`url` as an httpx.URL with an http(s) scheme and a host."""
    import httpx

    return _http_url(lambda: httpx.URL(url), f"{where}: invalid URL {url!r}",
                     f"{where}: {url!r} is not an http(s) URL with a host")


def _redirect_target(resp, current, where: str):
    """Where a redirect response points, resolved against `current`; only http(s) with a host."""
    location = resp.headers.get("location")
    if not location:
        raise ImageURLError(f"{where}: fetching {current} returned HTTP {resp.status_code} (a redirect) "
                            "without a Location header")
    return _http_url(lambda: current.join(location), f"{where}: {current} redirected to an invalid URL {location!r}",
                     f"{where}: {current} redirected to {location!r}, which is not an http(s) URL with a host")


async def _check_host(url, where: str, sources: ImageSources, came_from: str = "") -> None:
    """Refuse `url` (an httpx.URL) unless its host may be fetched: listed in `remote_hosts` if that is set,
    else every address it resolves to is public. Runs before any connection to that host."""
    host = url.host.lower()
    if sources.remote_hosts:
        if _normalised_or_none(host) not in sources.remote_hosts:
            raise ImageURLError(f"{where}: refusing to fetch {url}{came_from}: host {url.host!r} is not one of the "
                                f"allowed remote image hosts ({', '.join(sources.remote_hosts)}; "
                                "--remote-image-hosts)")
        return
    for address in await _resolve(host, where):
        kind = _non_public_kind(address)
        if kind:
            raise ImageURLError(f"{where}: refusing to fetch {url}{came_from}: host {url.host!r} resolves to "
                                f"{address}, a {kind} address (only public addresses are fetched by default); "
                                "if you trust this host, list it with --remote-image-hosts")


def _normalised_or_none(host: str) -> str | None:
    """`normalise_host(host)`, or None for a host that is not a valid bare name (it then matches nothing)."""
    try:
        return normalise_host(host)
    except ValueError:
        return None


async def _resolve(host: str, where: str) -> list:
    """The IP addresses of `host`: itself if an IP literal, else via getaddrinfo in a worker thread."""
    import asyncio
    import socket

    ip = _ip_literal(host)
    if ip is not None:
        return [ip]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageURLError(f"{where}: could not resolve host {host!r} ({exc})") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise ImageURLError(f"{where}: could not resolve host {host!r} (no addresses)")
    return addresses


def _non_public_kind(address) -> str:
    """'' for a globally routable unicast address, else a word for what it is (loopback, private, ...)."""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_global and not address.is_multicast:
        return ""
    for kind in ("loopback", "link-local", "private", "multicast", "unspecified", "reserved"):
        if getattr(address, "is_" + kind.replace("-", "_")):
            return kind
    return "non-public"


async def _read_capped(resp, url: str, where: str, sources: ImageSources, deadline: float) -> bytes:
    import time

    max_bytes = sources.max_bytes
    declared = resp.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageURLError(f"{where}: {url} is {declared} bytes, over the limit of {max_bytes}")
    chunks, total = [], 0
    async for chunk in resp.aiter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise ImageURLError(f"{where}: {url} is larger than the limit of {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise _too_slow(url, where, sources.remote_total_timeout_s)
        chunks.append(chunk)
    return b"".join(chunks)


async def image_bytes(url: str, where: str, sources: ImageSources) -> tuple[bytes, str]:
    """(bytes, a name for error messages) of an image_url value."""
    import asyncio

    if not isinstance(url, str) or not url:
        raise ImageURLError(f"{where}: image_url.url must be a non-empty string")
    scheme = urlparse(url[:64]).scheme.lower()
    if scheme == "data":
        return parse_data_url(url, where, sources.max_bytes), f"{where} (data URL)"
    if scheme in ("http", "https"):
        return await fetch_remote(url, where, sources), f"{where} ({url})"
    if scheme in ("", "file"):
        data, name = await asyncio.to_thread(read_local, url, where, sources)
        return data, f"{where} ({name})"
    raise ImageURLError(f"{where}: unsupported URL scheme {scheme!r} (use a data: URL)")
