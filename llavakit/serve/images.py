"""`image_url` values -> image bytes: `data:` URLs always; local files and http(s) only when enabled.

Every failure is an `ImageURLError` whose message names the request field at fault.
"""

from __future__ import annotations

import base64
import binascii
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
    """Limit on a whole remote fetch (connect, redirects, headers and body): catches a server that trickles bytes."""

    def __post_init__(self):
        for name in ("remote_timeout_s", "remote_total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ImageSources.{name} must be > 0, not {getattr(self, name)!r}")


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
    root = sources.local_dir.resolve()
    path = (root / raw).resolve()
    if not path.is_relative_to(root):
        raise ImageURLError(f"{where}: {raw!r} is outside the allowed image dir")
    if not path.is_file():
        raise ImageURLError(f"{where}: image file {raw!r} not found")
    if path.stat().st_size > sources.max_bytes:
        raise ImageURLError(f"{where}: {raw!r} is larger than the limit of {sources.max_bytes} bytes")
    return path.read_bytes(), raw


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


async def _fetch(url: str, where: str, sources: ImageSources, deadline: float) -> bytes:
    import httpx

    timeout = httpx.Timeout(min(sources.remote_timeout_s, sources.remote_total_timeout_s))
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=3) as client:
            async with client.stream("GET", url) as resp:
                if resp.status_code != 200:
                    raise ImageURLError(f"{where}: fetching {url} returned HTTP {resp.status_code}")
                return await _read_capped(resp, url, where, sources, deadline)
    except httpx.HTTPError as exc:
        raise ImageURLError(f"{where}: could not fetch {url}: {type(exc).__name__}: {exc}") from None


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
