"""The `openai` teacher against a fake OpenAI-compatible server on loopback, and kill-and-resume.

The fake server is scripted per image: each request for an image pops the next action
(ok, 500, 429:<retry-after>, hang, malformed, bad_output, truncated, 401); with an
empty script it answers ok. It records every request (image, kind, time, headers, body). `hang` does not answer
until the server stops, so a client timeout fires whatever the machine's load (after HANG_CAP_S it answers ok, so
a broken client timeout fails the test instead of hanging it).
No test asserts on elapsed time: retry waits are recorded by the `sleeps` fixture instead of slept.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llavakit.datagen import KINDS
from llavakit.datagen.config import DatagenError, InstructConfig, SourceConfig, TeacherConfig
from llavakit.datagen.instruct import generate_instruct
from llavakit.datagen.packs import load_pack
from llavakit.datagen.parse import format_qa

REPO = Path(__file__).resolve().parents[1]
HANG_CAP_S = 120  # a guard against hanging, not a speed limit: far beyond any client timeout used here


def ok_text(kind: str, image: int) -> str:
    if kind == "detail":
        return (f"The picture for scene {image} shows a red circle on the left and a blue square on the right, "
                "both on a plain white background.")
    if kind == "reasoning":
        return format_qa([("What would be left if the circle were removed?",
                           "Only the blue square would be left, since the picture holds just the two shapes.")])
    return format_qa([(f"How many shapes are in scene {image}?", "There are two shapes."),
                      ("Is there a green star?", "No, there is no green star.")])


class FakeOpenAI:
    def __init__(self, delay: float = 0.0, barrier: threading.Barrier | None = None):
        self.delay = delay
        self.script: dict[int, list[str]] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.inflight = self.max_inflight = 0
        self.released = threading.Event()
        """Set by stop(): lets `hang` requests go."""
        self.barrier = barrier
        """If set, the first `barrier.parties` requests wait there together (each must be in flight at once)."""
        self.barrier_broken = False
        kinds = {load_pack(k).system: k for k in KINDS}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                msgs = body["messages"]
                image = int(re.search(r"Scene (\d+):", msgs[-1]["content"]).group(1))
                kind = kinds[msgs[0]["content"]]
                with fake.lock:
                    queue = fake.script.get(image) or []
                    action = queue.pop(0) if queue else "ok"
                    fake.log.append({"image": image, "kind": kind, "action": action, "t": time.monotonic(),
                                     "auth": self.headers.get("Authorization"), "body": body})
                    fake.inflight += 1
                    fake.max_inflight = max(fake.max_inflight, fake.inflight)
                    meet = fake.barrier is not None and len(fake.log) <= fake.barrier.parties
                try:
                    if meet:
                        try:
                            fake.barrier.wait()
                        except threading.BrokenBarrierError:
                            fake.barrier_broken = True
                    time.sleep(fake.delay)
                    self._act(action, kind, image)
                finally:
                    with fake.lock:
                        fake.inflight -= 1

            def _act(self, action: str, kind: str, image: int) -> None:
                if action == "hang":  # no reply until the server stops: the client's timeout must fire
                    if fake.released.wait(HANG_CAP_S):
                        return
                    action = "ok"  # the client never gave up: answer, so the test fails rather than hangs
                if action in ("ok", "bad_output", "truncated"):
                    text = "Question:\nWhat is this?" if action == "bad_output" else ok_text(kind, image)
                    finish = "length" if action == "truncated" else "stop"
                    payload = {"id": "x", "object": "chat.completion", "model": "fake",
                               "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                            "finish_reason": finish}]}
                    return self._send(200, json.dumps(payload).encode())
                if action == "malformed":
                    return self._send(200, b'{"choices": [ this is not json')
                if action.startswith("429"):
                    return self._send(429, b'{"error": "slow down"}', {"Retry-After": action.split(":")[1]})
                self._send(int(action), b'{"error": "scripted failure"}')

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests_for(self, image: int, kind: str = "conversation") -> list[dict]:
        return [r for r in self.log if r["image"] == image and r["kind"] == kind]


@pytest.fixture
def server():
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


def make_coco(root: Path, n: int) -> SourceConfig:
    """n images with two shapes each; captions carry 'Scene <id>:' so the fake server knows the image."""
    (root / "images").mkdir(parents=True)
    images, anns, caps = [], [], []
    for i in range(1, n + 1):
        (root / "images" / f"img_{i:03d}.png").write_bytes(b"")
        images.append({"id": i, "file_name": f"img_{i:03d}.png", "width": 100, "height": 100})
        anns.append({"id": 2 * i, "image_id": i, "category_id": 1, "bbox": [5, 5, 20, 20], "iscrowd": 0})
        anns.append({"id": 2 * i + 1, "image_id": i, "category_id": 2, "bbox": [70, 70, 20, 20], "iscrowd": 0})
        caps.append({"id": 2 * i, "image_id": i, "caption": f"Scene {i}: a red circle and a blue square."})
        caps.append({"id": 2 * i + 1, "image_id": i, "caption": f"Scene {i}: two shapes on white."})
    cats = [{"id": 1, "name": "circle", "supercategory": "shape"},
            {"id": 2, "name": "square", "supercategory": "shape"}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": caps}))
    return SourceConfig(annotations=root / "instances.json", images_dir=root / "images")


def run(tmp_path: Path, server: FakeOpenAI, n: int = 3, *, kinds=("conversation",), name="data", **teacher_kw):
    src = make_coco(tmp_path / "src", n) if not (tmp_path / "src").exists() else \
        SourceConfig(annotations=tmp_path / "src" / "instances.json", images_dir=tmp_path / "src" / "images")
    teacher_kw = {"name": "openai", "url": server.url, "model": "fake-model", "backoff": 0.01, "timeout": 5.0,
                  **teacher_kw}
    retry_rejected = teacher_kw.pop("retry_rejected", False)
    cfg = InstructConfig(source=src, out=tmp_path / f"{name}.json", cache_dir=tmp_path / "cache", kinds=kinds,
                         teacher=TeacherConfig(**teacher_kw), progress=False, retry_rejected=retry_rejected)
    report = generate_instruct(cfg, log=lambda m: None)
    data = json.loads((tmp_path / f"{name}.json").read_text())
    rejections = [json.loads(x) for x in (tmp_path / f"{name}.rejections.jsonl").read_text().splitlines()]
    return report, data, rejections


def test_success_all_kinds_with_key_model_and_context_then_zero_calls_on_rerun(tmp_path, server, monkeypatch):
    monkeypatch.setenv("FAKE_KEY", "sekrit")
    report, data, rejections = run(tmp_path, server, kinds=KINDS, key_env="FAKE_KEY")
    t = report.totals
    assert (t.items, t.records, t.generated, t.rejected, t.retried, t.calls) == (9, 9, 9, 0, 0, 9)
    assert len(server.log) == 9 and rejections == []
    for req in server.log:
        assert req["auth"] == "Bearer sekrit"
        body = req["body"]
        assert body["model"] == "fake-model" and body["max_tokens"] == 1024 and body["temperature"] == 0.7
        pack = load_pack(req["kind"])
        assert len(body["messages"]) == 2 + 2 * len(pack.fewshot)
        context = body["messages"][-1]["content"]
        assert context.startswith(f"Scene {req['image']}: a red circle")
        has_boxes = "\n\ncircle: [0.050, 0.050, 0.250, 0.250]\nsquare: [0.700, 0.700, 0.900, 0.900]" in context
        assert has_boxes == (req["kind"] != "conversation")  # conversation sees captions only
    by_id = {r["id"]: r for r in data}
    conv = by_id["2-conversation"]
    assert conv["conversations"][0]["value"].replace("<image>", "").strip() == "How many shapes are in scene 2?"
    assert conv["provenance"]["teacher"] == "openai" and conv["provenance"]["model"] == "fake-model"
    assert by_id["2-detail"]["conversations"][1]["value"].startswith("The picture for scene 2")

    report2, data2, _ = run(tmp_path, server, kinds=KINDS, key_env="FAKE_KEY")
    assert len(server.log) == 9  # a rerun makes zero teacher calls
    assert (report2.totals.cached, report2.totals.calls) == (9, 0) and data2 == data


def test_500_then_success_is_retried(tmp_path, server):
    server.script[1] = ["500", "503", "ok"]
    report, data, rejections = run(tmp_path, server)
    st = report.kinds["conversation"]
    assert (st.generated, st.rejected, st.retried, st.calls) == (3, 0, 2, 3)
    assert dict(st.retry_reasons) == {"http_500": 1, "http_503": 1}
    assert [r["action"] for r in server.requests_for(1)] == ["500", "503", "ok"]
    assert len(data) == 3 and rejections == []


def test_429_honours_retry_after(tmp_path, server, sleeps):
    server.script[2] = ["429:1", "ok"]
    report, data, _ = run(tmp_path, server)
    reqs = server.requests_for(2)
    assert [r["action"] for r in reqs] == ["429:1", "ok"]
    assert sleeps == [1.0]  # the server's Retry-After; the backoff alone would be ~0.01 s
    st = report.kinds["conversation"]
    assert st.generated == 3 and dict(st.retry_reasons) == {"http_429": 1}


def test_timeouts_are_retried_then_counted_as_rejections_and_redone_on_rerun(tmp_path, server):
    # `hang` never answers, so these time out however slow the machine; good replies get a generous 5 s
    server.script[1] = ["hang", "ok"]
    server.script[3] = ["hang", "hang"]
    report, data, rejections = run(tmp_path, server, timeout=5.0, max_retries=1)
    st = report.kinds["conversation"]
    assert (st.generated, st.rejected, st.rejected_cached) == (2, 1, 0)
    assert dict(st.reasons) == {"timeout": 1} and dict(st.retry_reasons) == {"timeout": 2}
    assert [r["id"] for r in data] == ["1-conversation", "2-conversation"]
    assert len(rejections) == 1 and rejections[0]["id"] == "3-conversation"
    assert rejections[0]["code"] == "timeout" and "gave up after 2 attempts" in rejections[0]["message"]
    # a teacher failure is not cached: the rerun asks again (only for that item)
    n = len(server.log)
    report2, data2, rejections2 = run(tmp_path, server, timeout=5.0, max_retries=1)
    assert len(server.log) == n + 1 and server.log[-1]["image"] == 3
    assert (report2.totals.generated, report2.totals.cached, report2.totals.rejected) == (1, 2, 0)
    assert len(data2) == 3 and rejections2 == []


def test_malformed_body_and_truncation_are_counted_rejections_not_crashes(tmp_path, server):
    server.script[1] = ["malformed"]
    server.script[2] = ["truncated"]
    report, data, rejections = run(tmp_path, server)
    st = report.kinds["conversation"]
    assert (st.records, st.rejected, st.retried) == (1, 2, 0)
    assert dict(st.reasons) == {"malformed_body": 1, "truncated": 1}
    codes = {r["id"]: r["code"] for r in rejections}
    assert codes == {"1-conversation": "malformed_body", "2-conversation": "truncated"}
    assert len(server.requests_for(1)) == 1  # not retried
    report2, _, _ = run(tmp_path, server)
    assert report2.totals.calls == 2 and report2.totals.generated == 2


def test_rejected_output_is_reasked_then_cached(tmp_path, server):
    server.script[1] = ["bad_output", "ok"]
    server.script[2] = ["bad_output", "bad_output"]
    report, data, rejections = run(tmp_path, server)
    st = report.kinds["conversation"]
    assert (st.generated, st.rejected, st.retried, st.calls) == (2, 1, 2, 5)
    assert dict(st.reasons) == {"unanswered_question": 1}
    assert dict(st.retry_reasons) == {"unanswered_question": 2}
    assert rejections[0]["raw"] == "Question:\nWhat is this?"
    n = len(server.log)
    report2, _, _ = run(tmp_path, server)
    assert len(server.log) == n  # a rejected output is cached: no calls
    assert (report2.kinds["conversation"].rejected, report2.kinds["conversation"].rejected_cached) == (1, 1)
    report3, data3, _ = run(tmp_path, server, retry_rejected=True)
    assert len(server.log) == n + 1 and report3.totals.generated == 1 and len(data3) == 3


def test_a_reasked_rejection_that_fails_in_the_teacher_reports_the_new_error(tmp_path, server):
    server.script[2] = ["bad_output", "bad_output", "malformed"]
    run(tmp_path, server)
    report, _, rejections = run(tmp_path, server, retry_rejected=True)
    assert dict(report.kinds["conversation"].reasons) == {"malformed_body": 1}
    assert [(r["code"], r["cached"]) for r in rejections] == [("malformed_body", False)]


def test_concurrency_is_used_and_bounded(tmp_path):
    # the first three requests wait for each other: the barrier breaks (after 30 s) unless three are in flight at once;
    # the client's timeout is longer, so no timed-out request's retry can stand in for a concurrent one
    fake = FakeOpenAI(delay=0.15, barrier=threading.Barrier(3, timeout=30)).start()
    try:
        report, data, _ = run(tmp_path, fake, n=8, concurrency=3, timeout=60.0)
    finally:
        fake.stop()
    assert len(data) == 8 and len(fake.log) == 8  # each asked once
    assert not fake.barrier_broken, "three requests were never in flight together"
    assert fake.max_inflight <= 3  # the limit


def test_bad_key_stops_the_run_with_a_clear_error(tmp_path, server):
    server.script[1] = ["401"]
    with pytest.raises(DatagenError, match=r"answered 401.*\$OPENAI_API_KEY"):
        run(tmp_path, server, concurrency=1)


def test_wrong_url_stops_the_run_naming_the_flags(tmp_path, server):
    url = server.url.removesuffix("/v1")  # the fake answers 404 outside /v1
    with pytest.raises(DatagenError, match=r"answered 404.*--teacher-url.*--teacher-model 'fake-model'"):
        run(tmp_path, server, concurrency=1, url=url)
    assert len(server.log) == 0


def test_unreachable_server_stops_after_consecutive_failures(tmp_path):
    src = make_coco(tmp_path / "src", 30)
    with socket.socket() as held:  # bound but never listening, and held for the whole test: connections are refused
        held.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{held.getsockname()[1]}/v1"
        cfg = InstructConfig(source=src, out=tmp_path / "o.json", cache_dir=tmp_path / "c", kinds=("conversation",),
                             teacher=TeacherConfig(name="openai", url=url, model="m", max_retries=0),
                             progress=False, max_consecutive_failures=5)
        with pytest.raises(DatagenError, match="5 items in a row failed.*connection_error"):
            generate_instruct(cfg, log=lambda m: None)


# ---------------------------------------------------------------- kill and resume


def _cache_keys(cache: Path) -> list[str]:
    keys = []
    for f in cache.glob("*.jsonl"):
        data = f.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            keys.append(json.loads(line)["key"])
    return keys


def test_kill_and_resume_loses_and_duplicates_nothing(tmp_path):
    n = 12
    src = make_coco(tmp_path / "src", n)
    expected = {f"{i}-{k}" for i in range(1, n + 1) for k in KINDS}
    fake = FakeOpenAI(delay=0.08).start()
    cache, out = tmp_path / "cache", tmp_path / "data.json"
    cmd = [sys.executable, "-m", "llavakit.datagen.cli", "--annotations", str(src.instances),
           "--images-dir", str(src.images_dir), "--teacher", "openai", "--teacher-url", fake.url,
           "--teacher-model", "fake-model", "--concurrency", "2", "--cache", str(cache), "--out", str(out),
           "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for target in (4, 15):  # SIGKILL mid-run, twice, once the cache holds `target` records
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while len(_cache_keys(cache)) < target and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
            assert not out.exists()
            assert len(_cache_keys(cache)) >= target  # nothing written before the kill was lost
        # a torn last line, as if the machine died mid-write
        done = set(_cache_keys(cache))
        assert len(done) == len(_cache_keys(cache)) < 3 * n  # no duplicates in the cache so far
        with open(cache / "detail.jsonl", "ab") as f:
            f.write(b'{"key": "deadbeef", "teacher": "openai", "mod')
        before = len(fake.log)
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        resumed = fake.log[before:]
    finally:
        fake.stop()
    data = json.loads(out.read_text())
    ids = [r["id"] for r in data]
    assert len(ids) == len(set(ids)) == 3 * n and set(ids) == expected
    # the final run asked exactly for the items missing from the cache, each once
    asked = Counter(f"{r['image']}-{r['kind']}" for r in resumed)
    done_ids = {f"{e['image_id']}-{e['kind']}" for f in cache.glob("*.jsonl")
                for e in map(json.loads, f.read_text().splitlines()) if e["key"] in done}
    assert set(asked) == expected - done_ids and set(asked.values()) == {1}
    report = json.loads((tmp_path / "data.report.json").read_text())
    assert report["total"]["cached"] == len(done) and report["total"]["generated"] == 3 * n - len(done)
    assert report["total"]["calls"] == len(asked) and report["cache"]["torn"] == 1
    keys = _cache_keys(cache)
    assert len(keys) == len(set(keys)) == 3 * n  # every record exactly once in the cache too
