"""Remote image fetch limits (llavakit.serve.images): a total time limit, a byte cap, and the normal case.

No network: the origin is a local http.server on 127.0.0.1 in a thread.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from llavakit.serve.images import ImageSources, ImageURLError, fetch_remote
from test_serve import running

RED = Image.new("RGB", (40, 30), (200, 20, 20))
DRIP_BYTES, DRIP_EVERY_S = 30, 0.2  # a dripped response takes 6 s in full
LIMIT_S = 0.5


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


RED_PNG = png_bytes(RED)


class _Origin(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        try:
            if self.path == "/red.png":
                self._send(RED_PNG)
            elif self.path == "/big.png":  # declares its size: refused before any body is read
                self._send(b"\x89PNG" + b"\x00" * 300_000)
            elif self.path == "/big-undeclared.png":  # no Content-Length (HTTP/1.0, ends at close): cut off streaming
                self.send_response(200)
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"\x00" * 10_000)
            elif self.path == "/drip-body.png":  # headers at once, then one byte every 0.2 s
                self.send_response(200)
                self.send_header("Content-Length", str(DRIP_BYTES))
                self.end_headers()
                self._drip(b"\x00" * DRIP_BYTES)
            elif self.path == "/drip-headers.png":  # the headers themselves trickle in
                self._drip(b"HTTP/1.0 200 OK\r\n" + b"X-Pad: " + b"a" * DRIP_BYTES + b"\r\n\r\n" + RED_PNG)
            else:
                self._send(b"", status=404)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the fetch under test gave up

    def _send(self, body: bytes, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes):
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            time.sleep(DRIP_EVERY_S)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str, **kw) -> bytes:
    sources = ImageSources(**{"max_bytes": 200_000, "allow_remote": True, **kw})
    return asyncio.run(fetch_remote(url, "messages[0].content[0]", sources))


def test_normal_png_is_fetched(origin):
    assert fetch(origin + "/red.png", remote_total_timeout_s=LIMIT_S * 10) == RED_PNG


@pytest.mark.parametrize("path", ["/drip-body.png", "/drip-headers.png"])
def test_slow_drip_hits_the_total_time_limit(origin, path):
    url = origin + path
    start = time.monotonic()
    with pytest.raises(ImageURLError) as info:
        fetch(url, remote_total_timeout_s=LIMIT_S)  # per-operation timeout stays at its default (10 s)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert url in message and "total time limit of 0.5 s" in message, message
    assert elapsed < DRIP_BYTES * DRIP_EVERY_S / 2, f"took {elapsed:.1f} s; the drip lasts 6 s"


@pytest.mark.parametrize("path, needle", [
    ("/big.png", "300004 bytes, over the limit of 200000"),
    ("/big-undeclared.png", "larger than the limit of 200000 bytes"),
])
def test_oversized_body_is_refused(origin, path, needle):
    with pytest.raises(ImageURLError, match=needle):
        fetch(origin + path)


def test_remote_fetch_is_off_by_default(origin):
    with pytest.raises(ImageURLError, match="remote image URLs are disabled"):
        asyncio.run(fetch_remote(origin + "/red.png", "x", ImageSources()))


@pytest.mark.parametrize("bad", [0, -1.0])
def test_total_limit_must_be_positive(bad):
    with pytest.raises(ValueError, match="remote_total_timeout_s"):
        ImageSources(remote_total_timeout_s=bad)


def test_cli_flag_sets_the_total_limit():
    from llavakit.cli import build_parser
    from llavakit.serve.cli import config_from_args

    args = build_parser().parse_args(["serve", "--allow-remote-images", "--remote-total-timeout", "2.5"])
    assert config_from_args(args).images.remote_total_timeout_s == 2.5
    default = config_from_args(build_parser().parse_args(["serve"])).images
    assert default.remote_total_timeout_s == 30.0 and not default.allow_remote


@pytest.mark.usefixtures("one_torch_thread")
def test_server_answers_400_on_a_slow_drip(origin, tiny_model_dir):
    from llavakit.infer.api import load_pipeline
    from llavakit.serve.app import ServeConfig, create_app

    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    config = ServeConfig(images=ImageSources(allow_remote=True, remote_total_timeout_s=LIMIT_S))
    url = origin + "/drip-body.png"
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}
    with running(create_app(pipe, config)) as base:
        start = time.monotonic()
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        elapsed = time.monotonic() - start
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_image_url" and url in error["message"] and "total time limit" in error["message"]
    assert elapsed < DRIP_BYTES * DRIP_EVERY_S / 2, f"took {elapsed:.1f} s; the drip lasts 6 s"
