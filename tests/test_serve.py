"""The server: the real `openai` client (plain, streaming, images), 4xx cases, batching, queue limits."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from llavakit.infer.api import load_pipeline
from llavakit.serve.app import ServeConfig, create_app
from llavakit.serve.images import ImageSources

KEY = "sk-test-key"
RED = Image.new("RGB", (40, 30), (200, 20, 20))
BLUE = Image.new("RGB", (30, 50), (20, 20, 200))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn in a thread on a socket bound here (no free-port race); yield its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()  # uvicorn closes it on shutdown; this covers a server that never started


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    """A second pipeline for expected answers (the server's engine belongs to its worker thread)."""
    return load_pipeline(tiny_model_dir)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    images = tmp_path_factory.mktemp("served_images")
    RED.save(images / "red.png")
    config = ServeConfig(api_key=KEY, max_images=4, max_body_bytes=2 * 2**20, images=ImageSources(local_dir=images))
    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    with running(create_app(pipe, config)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def image_message(text: str, *images: Image.Image) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def expected(ref, text: str, images=(), max_tokens: int = 12) -> str:
    markers = "<image>\n" * len(images)
    return ref.generate([(list(images), markers + text)], max_new_tokens=max_tokens)[0]


def test_openai_client_plain_with_image(client, ref):
    resp = client.chat.completions.create(model="tiny", messages=image_message("What is this?", RED),
                                          temperature=0, max_tokens=12)
    assert resp.choices[0].message.content == expected(ref, "What is this?", [RED])
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.model == "tiny"
    assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens == len(ref.prompt([RED], "<image>\nWhat is this?").ids)


def test_openai_client_streaming_with_two_images(client, ref):
    stream = client.chat.completions.create(model="tiny", messages=image_message("Compare them.", RED, BLUE),
                                            temperature=0, max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == expected(ref, "Compare them.", [RED, BLUE], max_tokens=16)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_multi_turn_history_and_local_file(client, ref):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "red.png"}},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A red box."},
                {"role": "user", "content": "And its colour?"}]
    resp = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is this?"},
            {"role": "assistant", "content": "A red box."}, {"role": "user", "content": "And its colour?"}]
    assert resp.choices[0].message.content == ref.complete([([RED], conv)], ref_params(8))[0].text


def ref_params(n: int):
    from llavakit.infer.params import SamplingParams

    return SamplingParams(max_new_tokens=n)


def test_models_health_and_page(client, server):
    assert [m.id for m in client.models.list()] == ["tiny"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == "tiny"
    page = httpx.get(server + "/")
    assert page.status_code == 200 and "<script>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline


def _post(server, body=None, *, content=None, key=KEY, headers=None):
    h = {"Authorization": f"Bearer {key}"} if key else {}
    h.update(headers or {})
    return httpx.post(server + "/v1/chat/completions", json=body, content=content, headers=h, timeout=60)


def _user(*parts):
    return {"model": "tiny", "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}


def _img(url):
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is this?"}


@pytest.mark.parametrize("body, status, needle", [
    (_user(_img("data:image/png;base64,@@not base64@@"), TEXT), 400, "messages[0].content[0].image_url: invalid base64"),
    (_user(_img("data:text/plain;base64," + base64.b64encode(b"hello, not an image").decode()), TEXT), 400,
     "not an image"),
    (_user(*[_img(data_url(RED))] * 5, TEXT), 400, "5 images in the request; the limit is 4"),
    (_user({"type": "text", "text": "red green blue " * 1500}), 400, "context is 2048"),
    ({**_user(TEXT), "max_tokens": 5000}, 400, "ask for at most"),
    (_user(_img("https://example.com/cat.png"), TEXT), 400, "remote image URLs are disabled"),
    (_user(_img("../../etc/passwd"), TEXT), 400, "outside the allowed image dir"),
    (_user(_img("ftp://x/y.png"), TEXT), 400, "unsupported URL scheme 'ftp'"),
    (_user({"type": "text", "text": "look: <image>"}), 400, "reserved token '<image>'"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [_img(data_url(RED))]},
                                    {"role": "user", "content": "and?"}]}, 400, "images may only be sent in user messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "only n=1"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model 'other' not found"),
    ({**_user(TEXT), "seed": 2**64}, 400, "seed"),
    ({**_user(TEXT), "temperature": 1e-9}, 400, "temperature must be 0 (greedy) or in [1e-06, 100]"),
    ({**_user(TEXT), "min_tokens": 9}, 400, "min_tokens (9) is more than max_tokens (4)"),
    ({**_user(TEXT), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: at most 4 strings"),
    (_user(_img("red\x00.png"), TEXT), 400, "messages[0].content[0].image_url: cannot read image file"),
])
def test_bad_requests_get_clear_4xx(server, body, status, needle):
    r = _post(server, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_fields_llavakit_ignores_are_accepted_and_max_completion_tokens_is_honoured(server):
    """docs/inference.md: tools, response_format, logprobs, penalties ... are accepted and ignored; a tool message
    is refused; max_completion_tokens caps the answer as max_tokens does."""
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 6}
    plain = _post(server, base).json()["choices"][0]["message"]["content"]
    extras = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "none",
              "response_format": {"type": "text"}, "logprobs": False, "frequency_penalty": 0.5, "presence_penalty": 0.5,
              "logit_bias": {"1": 5}, "user": "someone"}
    r = _post(server, {**base, **extras})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == plain
    capped = _post(server, {**{k: v for k, v in base.items() if k != "max_tokens"}, "max_completion_tokens": 2}).json()
    assert capped["usage"]["completion_tokens"] <= 2
    tool = _post(server, {**base, "messages": [{"role": "tool", "content": "42"}, {"role": "user", "content": "hi"}]})
    assert tool.status_code == 400 and "messages[0].role" in tool.json()["error"]["message"]


def test_error_param_names_the_field_and_developer_is_system(server, ref):
    assert _post(server, {**_user(TEXT), "temperature": 1e-9}).json()["error"]["param"] == "temperature"
    assert _post(server, {**_user(TEXT), "min_tokens": 9}).json()["error"]["param"] == "min_tokens"
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = _post(server, {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0})
    want = ref.complete([([], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])],
                        ref_params(6))[0].text
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want


def test_bad_body_auth_and_size(server):
    assert _post(server, content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 400
    r = _post(server, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}, key=None)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert _post(server, {"model": "tiny", "messages": []}, key="wrong").status_code == 401
    big = _user(_img("data:image/png;base64," + "A" * (3 * 2**20)), TEXT)
    r = _post(server, big)
    assert r.status_code == 413 and "limit is 2097152" in r.json()["error"]["message"]

    def chunked():
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(3):
            yield b"x" * 2**20
        yield b'"}]}'

    r = httpx.post(server + "/v1/chat/completions", content=chunked(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413  # no Content-Length: counted while reading
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/health").json()["status"] == "ok"  # still alive after all of it


class GatedEngine:
    """The real engine, but each batch waits for `gate` first: lets a test fill the queue deterministically."""

    def __init__(self, engine):
        self.engine, self.gate, self.entered, self.rows = engine, threading.Event(), threading.Event(), []

    def run(self, rows, **kw):
        self.rows += rows
        self.entered.set()
        self.gate.wait(30)
        yield from self.engine.run(rows, **kw)


class SteppedEngine(GatedEngine):
    """The real engine, but after each step that produced text it waits for `gate`: a row cannot finish (or even
    get past its first text) before the test lets it."""

    def run(self, rows, **kw):
        self.rows += rows
        self.entered.set()
        for events in self.engine.run(rows, **kw):
            yield events
            if any(ev.text for ev in events):
                self.gate.wait(60)


class FailingEngine:
    """An engine whose every batch fails with a message that must not reach the client."""

    def run(self, rows, **kw):
        raise RuntimeError("/secret/path/to/weights is corrupt")
        yield  # a generator, as the engine's run is


def test_a_failing_batch_is_a_500_naming_only_the_exception_type(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    pipe.engine = FailingEngine()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with running(create_app(pipe)) as url:
        plain = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        streamed = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60).text
        assert httpx.get(url + "/health").json()["status"] == "ok"  # the server stays up
    assert plain.status_code == 500 and "generation failed (RuntimeError)" in plain.json()["error"]["message"]
    assert "generation failed (RuntimeError)" in streamed and streamed.rstrip().endswith("data: [DONE]")
    assert "secret" not in plain.text and "secret" not in streamed


def test_full_queue_answers_503_and_recovers(tiny_model_dir, monkeypatch):
    """503 at once, before the request's images are read (make_job) or anything is queued."""
    import llavakit.serve.app as app_module

    built = []
    real_make_job = app_module.make_job

    async def make_job(req, pipeline, config):
        built.append(req)
        return await real_make_job(req, pipeline, config)

    monkeypatch.setattr(app_module, "make_job", make_job)
    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    gated = GatedEngine(pipe.engine)
    pipe.engine = gated
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    with running(create_app(pipe, ServeConfig(max_batch_size=1, max_queue=1, batch_wait_ms=0))) as url, \
            ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
        assert gated.entered.wait(30)  # the worker holds request 1
        second = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        third = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert "queue is full" in third.json()["error"]["message"]
        assert len(built) == 2  # the third request's job (images, prompt) was never built
        gated.gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200


def test_concurrent_requests_are_batched(tiny_model_dir, ref):
    """The first request holds the model thread until the other three are queued: they join its batch."""
    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    gated = GatedEngine(pipe.engine)
    pipe.engine = gated
    questions = ["What is this?", "Describe the picture.", "How many objects are there?", "Is there a cat?"]
    images = [[RED], [], [BLUE], [RED, BLUE]]

    def ask(url, q, ims):
        body = {"model": "tiny", "messages": image_message(q, *ims), "temperature": 0, "max_tokens": 10}
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]

    with running(create_app(pipe, ServeConfig(max_batch_size=8, batch_wait_ms=5))) as url, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(ask, url, q, ims) for q, ims in zip(questions, images)]
        assert gated.entered.wait(30)
        deadline = time.monotonic() + 30
        while len(gated.rows) + httpx.get(url + "/health").json()["queued"] < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        gated.gate.set()
        answers = [f.result() for f in futures]
        health = httpx.get(url + "/health").json()
    assert health["max_batch_seen"] >= 3 and health["requests"] == 4
    assert answers == [expected(ref, q, ims, max_tokens=10) for q, ims in zip(questions, images)]


def test_client_disconnect_cancels_its_row(tiny_model_dir, ref):
    prompt = "Tell me everything."
    uncut = ref.complete([([], prompt)], ref_params(300))[0]
    assert uncut.finish_reason == "length"  # greedy runs to the limit unless cancelled
    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    stepped = SteppedEngine(pipe.engine)  # holds the row after its first text until the test lets it go on
    pipe.engine = stepped
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 300, "stream": True,
            "temperature": 0}
    with running(create_app(pipe)) as url:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while '"content": ""' in (line := next(lines)) or not line:
                pass  # up to the first generated text: the row is decoding (and held); then hang up
        deadline = time.monotonic() + 30
        while not stepped.rows[0].cancelled() and time.monotonic() < deadline:
            time.sleep(0.02)  # the server notices the hang-up and cancels the row
        assert stepped.rows[0].cancelled()
        stepped.gate.set()  # only now may the row decode on: it must stop at the next step
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["batches"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health").json()
    assert health["cancelled"] == 1 and health["generated_tokens"] < 300


def test_client_leaving_a_non_streaming_request_cancels_its_row(tiny_model_dir):
    """uvicorn tells only streaming responses of a disconnect: the handler polls, so the row stops decoding."""
    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    gated = GatedEngine(pipe.engine)
    pipe.engine = gated
    body = ('{"model": "tiny", "messages": [{"role": "user", "content": "Tell me everything."}], '
            '"max_tokens": 300, "temperature": 0}').encode()
    with running(create_app(pipe)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert gated.entered.wait(30)  # the worker holds the request; now hang up
        deadline = time.monotonic() + 30
        while not gated.rows[0].cancelled() and time.monotonic() < deadline:
            time.sleep(0.02)  # the handler polls for the disconnect and cancels the row
        assert gated.rows[0].cancelled()
        gated.gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health").json()["batches"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health").json()
    assert health["cancelled"] == 1 and health["generated_tokens"] < 300, health


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        if self.path == "/slow.png":  # silent until the origin stops (at most 120 s): the fetch's timeout must fire
            self.server.stopping.wait(120)
        body = png_bytes(RED) if self.path in ("/red.png", "/slow.png") else b""
        if self.path == "/big.png":
            body = b"\x89PNG" + b"\x00" * 300_000
        try:
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server under test gave up (its fetch timed out)

    def log_message(self, *args):
        pass


def test_remote_images_when_enabled_with_limits(tiny_model_dir, ref):
    origin = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    origin.stopping = threading.Event()
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{origin.server_address[1]}"
    pipe = load_pipeline(tiny_model_dir, model_id="tiny")
    # a generous per-operation timeout for the good replies; /slow.png never answers, so it times out all the same
    sources = ImageSources(max_bytes=200_000, allow_remote=True, remote_timeout_s=5.0, remote_hosts=("127.0.0.1",))
    try:
        with running(create_app(pipe, ServeConfig(images=sources))) as url:
            ok = _post(url, {**_user(_img(base + "/red.png"), TEXT), "temperature": 0})
            assert ok.status_code == 200
            assert ok.json()["choices"][0]["message"]["content"] == expected(ref, "What is this?", [RED], max_tokens=4)
            for path, needle in [("/big.png", "over the limit of 200000"),
                                 ("/slow.png", "could not fetch .*ReadTimeout"), ("/missing.png", "returned HTTP 404")]:
                r = _post(url, _user(_img(base + path), TEXT))
                assert r.status_code == 400 and re.search(needle, r.json()["error"]["message"]), r.text
    finally:
        origin.stopping.set()
        origin.shutdown()
