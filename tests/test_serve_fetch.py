"""Remote image fetch (llavakit.serve.images): a total time limit, a byte cap, the normal case, and where a fetch
may go (non-public addresses refused by default, the --remote-image-hosts allow-list, redirects checked hop by hop).

No network: the origin is a local http.server on 127.0.0.1 in a thread (so the tests list 127.0.0.1 as allowed).
No test asserts on elapsed time: a dripped response lasts far longer than any limit under test (it stops when the
client hangs up or the origin shuts down), so a fetch that ends with the limit's error was cut off by the limit.
"""

from __future__ import annotations

import asyncio
import io
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from llavakit.serve.images import ImageSources, ImageURLError, fetch_remote
from test_serve import running

RED = Image.new("RGB", (40, 30), (200, 20, 20))
DRIP_BYTES, DRIP_EVERY_S = 600, 0.2  # a dripped response takes 120 s in full: if a limit failed, the fetch would
# end with the whole response (a wrong result) after that, rather than hang
LIMIT_S = 0.5


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


RED_PNG = png_bytes(RED)
LOCAL = ("127.0.0.1",)  # remote_hosts that lets a fetch reach the origin


class _Origin(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        self.server.hits.append(self.path)
        try:
            if self.path == "/red.png":
                self._send(RED_PNG)
            elif self.path.startswith("/hop/"):  # /hop/N: N relative redirects, then the image
                left = int(self.path.rsplit("/", 1)[1])
                self._redirect(f"/hop/{left - 1}" if left > 0 else "/red.png")
            elif self.path == "/to-localhost":  # the same server under a name that is not allow-listed
                self._redirect(f"http://localhost:{self.server.server_address[1]}/red.png")
            elif self.path == "/to-file":
                self._redirect("file:///etc/passwd")
            elif self.path == "/no-location":
                self._send(b"", status=302)
            elif self.path == "/big.png":  # declares its size: refused before any body is read
                self._send(b"\x89PNG" + b"\x00" * 300_000)
            elif self.path == "/big-undeclared.png":  # no Content-Length (HTTP/1.0, ends at close): cut off streaming
                self.send_response(200)
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"\x00" * 10_000)
            elif self.path == "/drip-body.png":  # headers at once, then one byte every DRIP_EVERY_S
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

    def _redirect(self, location: str, status: int = 302):
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, body: bytes, status: int = 200):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes):
        """One byte every DRIP_EVERY_S until done, the client hangs up (BrokenPipeError) or the origin stops."""
        for i in range(len(data)):
            self.wfile.write(data[i:i + 1])
            if self.server.stopping.wait(DRIP_EVERY_S):
                return

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def origin_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.hits = []  # request paths, in order: shows whether a refused fetch connected at all
    server.stopping = threading.Event()  # ends any drip still running
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def origin(origin_server) -> str:
    """The origin's base URL, e.g. `origin + "/red.png"`."""
    return f"http://127.0.0.1:{origin_server.server_address[1]}"


def fetch(url: str, **kw) -> bytes:
    sources = ImageSources(**{"max_bytes": 200_000, "allow_remote": True, "remote_hosts": LOCAL, **kw})
    return asyncio.run(fetch_remote(url, "messages[0].content[0]", sources))


def test_normal_png_is_fetched(origin):
    assert fetch(origin + "/red.png", remote_total_timeout_s=LIMIT_S * 10) == RED_PNG


@pytest.mark.parametrize("path", ["/drip-body.png", "/drip-headers.png"])
def test_slow_drip_hits_the_total_time_limit(origin, path):
    url = origin + path
    with pytest.raises(ImageURLError) as info:  # without the limit the whole drip would arrive: no error
        fetch(url, remote_total_timeout_s=LIMIT_S)  # per-operation timeout stays at its default (10 s)
    message = str(info.value)
    assert url in message and "total time limit of 0.5 s" in message, message


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
    config = ServeConfig(images=ImageSources(allow_remote=True, remote_total_timeout_s=LIMIT_S, remote_hosts=LOCAL))
    url = origin + "/drip-body.png"
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}]}
    with running(create_app(pipe, config)) as base:
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_image_url" and url in error["message"] and "total time limit" in error["message"]


# Where a fetch may go: non-public addresses refused by default, the allow-list, redirects checked hop by hop.

WHERE = "messages[0].content[0]"


@pytest.fixture
def no_requests(monkeypatch):
    """Fail the test if httpx sends any request: a refusal must come before connecting."""
    async def refuse(*args, **kwargs):
        raise AssertionError(f"a request was sent: {args[1] if len(args) > 1 else kwargs}")

    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)


@pytest.mark.usefixtures("no_requests")
@pytest.mark.parametrize("url, host, address, kind", [
    ("http://127.0.0.1:{port}/red.png", "127.0.0.1", "127.0.0.1", "loopback"),
    ("http://localhost:{port}/red.png", "localhost", "(127.0.0.1|::1)", "loopback"),  # either, by /etc/hosts
    ("http://[::1]:{port}/red.png", "::1", "::1", "loopback"),
    ("http://[::ffff:127.0.0.1]:{port}/red.png", "::ffff:127.0.0.1", "::ffff:7f00:1", "loopback"),
    ("http://10.0.0.1/cat.png", "10.0.0.1", "10.0.0.1", "private"),
    ("http://192.168.1.1/cat.png", "192.168.1.1", "192.168.1.1", "private"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "169.254.169.254", "link-local"),
])
def test_non_public_addresses_are_refused_by_default(origin_server, url, host, address, kind):
    before = len(origin_server.hits)
    url = url.format(port=origin_server.server_address[1])
    with pytest.raises(ImageURLError) as info:
        fetch(url, remote_hosts=())
    message = str(info.value)
    assert message.startswith(WHERE + ": refusing to fetch"), message
    assert re.search(f"host {re.escape(repr(host))} resolves to {address}, a {kind} address", message), message
    assert "--remote-image-hosts" in message, message
    assert origin_server.hits[before:] == []


def test_public_address_passes_the_check(monkeypatch):
    """Default mode lets a public address through to the request (stubbed: no network here)."""
    sent = []

    async def stub(self, request, **kwargs):
        sent.append(str(request.url))
        raise httpx.ConnectError("stubbed: no network in tests")

    monkeypatch.setattr(httpx.AsyncClient, "send", stub)
    with pytest.raises(ImageURLError, match="could not fetch .*ConnectError: stubbed"):
        fetch("http://8.8.8.8/cat.png", remote_hosts=())
    assert sent == ["http://8.8.8.8/cat.png"]


@pytest.mark.usefixtures("no_requests")
def test_unresolvable_host_is_refused():
    with pytest.raises(ImageURLError, match=r"could not resolve host 'no-such-host\.invalid'"):
        fetch("http://no-such-host.invalid/cat.png", remote_hosts=(), remote_total_timeout_s=10)


def test_listed_host_is_fetched_and_others_refused(origin, origin_server):
    before = len(origin_server.hits)
    assert fetch(origin + "/red.png", remote_hosts=("127.0.0.1",)) == RED_PNG
    assert origin_server.hits[before:] == ["/red.png"]
    same_server = f"http://localhost:{origin_server.server_address[1]}/red.png"
    with pytest.raises(ImageURLError) as info:
        fetch(same_server, remote_hosts=("127.0.0.1",))
    message = str(info.value)
    assert f"refusing to fetch {same_server}: host 'localhost' is not one of the allowed remote image hosts " \
           "(127.0.0.1; --remote-image-hosts)" in message, message
    assert origin_server.hits[before:] == ["/red.png"]


def test_listed_name_is_trusted_case_insensitively(origin_server):
    url = f"http://LocalHost:{origin_server.server_address[1]}/red.png"
    assert fetch(url, remote_hosts=("LOCALHOST",)) == RED_PNG


def test_redirect_to_an_unlisted_host_is_refused_before_following(origin, origin_server):
    before = len(origin_server.hits)
    with pytest.raises(ImageURLError) as info:
        fetch(origin + "/to-localhost")
    message = str(info.value)
    target = f"http://localhost:{origin_server.server_address[1]}/red.png"
    assert f"refusing to fetch {target} (redirected from {origin}/to-localhost): host 'localhost'" in message, message
    assert origin_server.hits[before:] == ["/to-localhost"]


def test_redirect_on_the_listed_host_is_followed(origin, origin_server):
    before = len(origin_server.hits)
    assert fetch(origin + "/hop/1") == RED_PNG
    assert origin_server.hits[before:] == ["/hop/1", "/hop/0", "/red.png"]


def test_three_redirects_are_followed_and_a_fourth_refused(origin, origin_server):
    assert fetch(origin + "/hop/2") == RED_PNG  # /hop/2 -> /hop/1 -> /hop/0 -> /red.png: 3 redirects
    before = len(origin_server.hits)
    with pytest.raises(ImageURLError, match=r"too many redirects \(more than 3\); the last pointed to .*/red\.png"):
        fetch(origin + "/hop/3")
    assert origin_server.hits[before:] == ["/hop/3", "/hop/2", "/hop/1", "/hop/0"]  # /red.png never asked for


@pytest.mark.parametrize("path, needle", [
    ("/no-location", "returned HTTP 302 (a redirect) without a Location header"),
    ("/to-file", "redirected to 'file:///etc/passwd', which is not an http(s) URL"),
])
def test_bad_redirects_are_refused(origin, path, needle):
    with pytest.raises(ImageURLError) as info:
        fetch(origin + path)
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("bad", ["http://images.example.com", "images.example.com/cats", "",
                                 "images.example.com:8080", "[not-an-ip]", "user@images.example.com"])
def test_bad_remote_hosts_are_refused(bad):
    with pytest.raises(ValueError, match="remote image host"):
        ImageSources(remote_hosts=(bad,))


def test_remote_hosts_must_be_a_sequence_not_a_string():
    with pytest.raises(ValueError, match="must be a tuple of host names"):
        ImageSources(remote_hosts="127.0.0.1")


def test_remote_hosts_are_normalised():
    sources = ImageSources(remote_hosts=("Images.Example.COM", "[::1]", "0:0::1", " 10.0.0.5 "))
    assert sources.remote_hosts == ("images.example.com", "::1", "::1", "10.0.0.5")


def test_cli_flag_sets_the_remote_hosts(capsys, monkeypatch):
    from llavakit.cli import build_parser, main
    from llavakit.serve.cli import config_from_args

    args = build_parser().parse_args(["serve", "--allow-remote-images",
                                      "--remote-image-hosts", "127.0.0.1,Images.Example.com,[::1]"])
    assert config_from_args(args).images.remote_hosts == ("127.0.0.1", "images.example.com", "::1")
    assert config_from_args(build_parser().parse_args(["serve"])).images.remote_hosts == ()
    alone = build_parser().parse_args(["serve", "--remote-image-hosts", "127.0.0.1"])
    with pytest.raises(ValueError, match="--remote-image-hosts has no effect without --allow-remote-images"):
        config_from_args(alone)
    bad = build_parser().parse_args(["serve", "--allow-remote-images", "--remote-image-hosts",
                                     "127.0.0.1,http://evil.example"])
    with pytest.raises(ValueError, match="--remote-image-hosts '127.0.0.1,http://evil.example': remote image host "
                                         "'http://evil.example' must be a bare host name"):
        config_from_args(bad)
    monkeypatch.setenv("LLAVAKIT_DEBUG", "0")  # main prints the error instead of raising it
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")  # main sets it; restored after the test
    assert main(["serve", "--allow-remote-images", "--remote-image-hosts", "a.example,"]) == 1  # before any model loads
    assert "llavakit serve: error: --remote-image-hosts 'a.example,'" in capsys.readouterr().err
