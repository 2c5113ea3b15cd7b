"""Server load: 200 requests with images, 16 concurrent clients, against a real `llavakit serve`.

The server is its own process (`python -m llavakit.cli serve` on 127.0.0.1, a free port), so its
peak memory is its own: the kernel's high-water mark `VmHWM` from /proc, read after warm-up and
after the load. Every request carries a different image (PNG or JPEG, several sizes) as a data URL
and asks for a fixed number of greedy tokens (`min_tokens` = `max_tokens`). Errors are non-200
answers, transport failures and bodies without the asked-for tokens; the goal is none. Latency is
per request, from send to the full answer; throughput is requests per wall-clock second, beside the
same server answering requests one at a time (the baseline).

Full: the benchmark model (SmolLM2-135M behind a tiny CLIP, 576 image tokens per image).
Quick: a tiny random model (CLIP 32 px + a 2-layer Llama, 16 image tokens), for a fast check.
Run: python -m bench.server_load [--quick]
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import free_port, row, table, write_result  # noqa: E402

NAME = "server_load"
REQUESTS = 200
CLIENTS = 16
SEQUENTIAL = 8
"""Requests sent one at a time first: the unloaded latency and the throughput baseline."""
REPO = Path(__file__).resolve().parents[1]


def tiny_model_dir() -> Path:
    """A tiny random CLIP + Llama model, built once into the llavakit cache."""
    from llavakit.model.build import InitConfig, init_model
    from llavakit.model.hub import cache_dir
    from llavakit.model.tiny import tiny_clip, tiny_llama

    root = cache_dir() / "bench" / "tiny-load"
    if (root / "model" / "config.json").is_file():
        return root / "model"
    return init_model(InitConfig(vision=str(tiny_clip(root / "clip")), lm=str(tiny_llama(root / "llama")),
                                 out=str(root / "model")))


def image_url(i: int) -> str:
    from llavakit.infer.benchmodel import bench_image

    fmt = "PNG" if i % 2 else "JPEG"
    buf = io.BytesIO()
    bench_image(i, size=(96 + 16 * (i % 5), 72 + 12 * (i % 3))).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(i: int, tokens: int) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_url(i)}},
             {"type": "text", "text": f"Request {i}: what is in this picture?"}]
    return {"model": "load", "temperature": 0, "max_tokens": tokens, "min_tokens": tokens,
            "messages": [{"role": "user", "content": parts}]}


@contextlib.contextmanager
def server_process(model: Path, log: Path):
    """`llavakit serve` in a child process; yields (base URL, pid); stopped (and reaped) on exit."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "llavakit.cli", "serve", "--model", str(model), "--model-id", "load",
           "--port", str(port), "--max-batch-size", str(CLIENTS), "--max-queue", str(4 * CLIENTS)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {log}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc status")


def send(client, url: str, body: dict) -> tuple[float, str | None]:
    """(latency s, error or None) of one request."""
    import httpx

    t0 = time.perf_counter()
    try:
        r = client.post(url + "/v1/chat/completions", json=body, timeout=900)
    except httpx.HTTPError as exc:
        return time.perf_counter() - t0, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t0
    if r.status_code != 200:
        return seconds, f"HTTP {r.status_code}: {r.text[:200]}"
    got = r.json().get("usage", {}).get("completion_tokens")
    return seconds, None if got == body["max_tokens"] else f"{got} tokens, asked for {body['max_tokens']}"


def load(url: str, bodies: list[dict], clients: int) -> tuple[list[float], list[str], float]:
    """`clients` threads (one connection each) take the next request until none is left."""
    import httpx

    latencies, errors, lock, it = [], [], threading.Lock(), iter(bodies)

    def client_run() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    body = next(it, None)
                if body is None:
                    return
                seconds, error = send(client, url, body)
                with lock:
                    latencies.append(seconds)
                    errors.extend([error] if error else [])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client_run) for _ in range(clients)]:
            f.result()
    return latencies, errors, time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run(quick: bool = False) -> dict:
    import httpx

    from llavakit.infer.benchmodel import bench_model_dir, cpu_pressure

    model, tokens = tiny_model_dir() if quick else bench_model_dir(), 8
    label = "tiny random CLIP-32px + 2-layer Llama" if quick else model.name
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "llavakit-bench-server-load.log"
    with server_process(model, log) as (url, pid):
        load(url, [request_body(10_000 + i, 2) for i in range(2)], 1)  # warm up
        warm_rss = peak_rss_mib(pid)
        seq_lat, seq_err, seq_s = load(url, [request_body(1000 + i, tokens) for i in range(SEQUENTIAL)], 1)
        latencies, errors, wall = load(url, [request_body(i, tokens) for i in range(REQUESTS)], CLIENTS)
        rss = peak_rss_mib(pid)
        health = httpx.get(url + "/health").json()
    ms = [s * 1000 for s in latencies]
    p50, p99 = statistics.median(ms), percentile(ms, 99)
    rows = [
        row(f"errors, {REQUESTS} image requests, {CLIENTS} concurrent", float(len(errors) + len(seq_err)), "count",
            goal="0"),
        row("latency p50 under load", p50, "ms"),
        row("latency p99 under load", p99, "ms"),
        row("latency of one request alone (median)", statistics.median(seq_lat) * 1000, "ms"),
        row(f"throughput, {CLIENTS} concurrent", REQUESTS / wall, "req/s", SEQUENTIAL / seq_s, "(vs one at a time)"),
        row("server peak RSS after the load", rss, "MiB", goal="(bounded)"),
        row("server peak RSS after warm-up", warm_rss, "MiB"),
    ]
    result = {"name": NAME, "rows": rows, "cpu_pressure_after": cpu_pressure(), "quick": quick,
              "model": label, "image_tokens_per_image": _image_tokens(model), "requests": REQUESTS,
              "clients": CLIENTS, "tokens_per_request": tokens, "wall_s": wall, "errors": errors[:10],
              "batch_sizes": health["batch_sizes"], "latency_ms": {"p50": p50, "p90": percentile(ms, 90), "p99": p99,
                                                                   "max": max(ms)}}
    result["doc"] = doc_section(result)
    return result


def _image_tokens(model: Path) -> int:
    import json

    return int(json.loads((model / "config.json").read_text())["image_seq_length"])


def doc_section(r: dict) -> str:
    """The 'Server load' section of docs/performance.md (rendered by `python -m bench`)."""
    v = {x["measure"]: x for x in r["rows"]}
    thr = v[f"throughput, {CLIENTS} concurrent"]
    return (
        "## Server load\n\n"
        f"`python -m bench --only {NAME}{' --quick' if r['quick'] else ''}` (or `python -m bench.{NAME}`): "
        f"a `llavakit serve` process on 127.0.0.1 with `--max-batch-size {CLIENTS}`, model `{r['model']}` "
        f"({r['image_tokens_per_image']} image tokens per image), {r['requests']} requests from {r['clients']} "
        f"concurrent clients, each with its own image (PNG or JPEG data URL) and {r['tokens_per_request']} greedy "
        "tokens to generate.\n\n"
        f"- errors: **{int(v[f'errors, {REQUESTS} image requests, {CLIENTS} concurrent']['value'])}**\n"
        f"- latency p50 **{r['latency_ms']['p50']:.0f} ms**, p90 {r['latency_ms']['p90']:.0f} ms, "
        f"p99 **{r['latency_ms']['p99']:.0f} ms**, max {r['latency_ms']['max']:.0f} ms "
        f"(one request alone: {v['latency of one request alone (median)']['value']:.0f} ms)\n"
        f"- throughput {thr['value']:.2f} req/s ({thr['ratio']:.2f}x the {thr['baseline']:.2f} req/s of one request "
        f"at a time); {r['requests']} requests in {r['wall_s']:.1f} s; batch sizes seen {r['batch_sizes']}\n"
        f"- server peak RSS (VmHWM) **{v['server peak RSS after the load']['value']:.0f} MiB** after the load, "
        f"{v['server peak RSS after warm-up']['value']:.0f} MiB after warm-up\n"
        f"- CPU pressure after the run (PSI avg10/avg60, % of time runnable tasks waited): {r['cpu_pressure_after']}\n"
    )


def main() -> None:
    result = run("--quick" in sys.argv)
    print(table([result]))
    print(result["doc"])
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
