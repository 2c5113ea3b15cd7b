"""Server throughput: 8 concurrent clients vs the same requests sent one at a time.

A real uvicorn server on localhost serves the benchmark model. Two workloads: image questions
(each request carries a 576-token image as a data URL, so prefill is a large share of the work)
and text chat (short prompts, decode-dominated). Every request asks for a fixed number of tokens
(`min_tokens` = `max_tokens`, greedy), so both runs do the same work. Throughput is generated
tokens per wall-clock second. Concurrent image questions are mostly prefill-bound: the engine
prefills short requests of similar length in one forward and long ones one by one, decodes all rows
as one batch (several-row products through oneDNN), and the worker gathers a burst of arrivals into
one batch (see llavakit/serve/worker.py, llavakit/infer/engine.py).
Run: python -m bench.server_throughput [--quick]
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import row, table, write_result  # noqa: E402

NAME = "server_throughput"
CLIENTS = 8


@contextlib.contextmanager
def serving(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def request_body(i: int, tokens: int, image: bool) -> dict:
    from llavakit.infer.benchmodel import bench_image

    parts = [{"type": "text", "text": f"Question {i}: describe the image." if image else f"Tell me fact number {i} about owls."}]
    if image:
        buf = io.BytesIO()
        bench_image(i).save(buf, format="PNG")
        parts.insert(0, {"type": "image_url",
                         "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
    return {"model": "bench", "temperature": 0, "max_tokens": tokens, "min_tokens": tokens,
            "messages": [{"role": "user", "content": parts}]}


def post(client, url: str, body: dict) -> int:
    r = client.post(url + "/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def sequential(url: str, bodies: list[dict]) -> tuple[int, float]:
    import httpx

    with httpx.Client() as client:
        t0 = time.perf_counter()
        tokens = sum(post(client, url, b) for b in bodies)
        return tokens, time.perf_counter() - t0


def concurrent(url: str, bodies: list[dict]) -> tuple[int, float]:
    """CLIENTS clients, each sending its share of the requests one after another."""
    import httpx

    shares = [bodies[c::CLIENTS] for c in range(CLIENTS)]

    def client_run(share):
        with httpx.Client() as client:
            return sum(post(client, url, b) for b in share)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(client_run, shares))
    return tokens, time.perf_counter() - t0


def ceiling(url: str, bodies: list[dict], seq_s: float) -> dict:
    """The best concurrent/sequential ratio any batching could give these requests, from this run's timings.

    Each request costs `front` (HTTP, image decode, tower, prefill, first token) plus its decode steps. The
    front end (mostly prefill) is compute-bound and the same work whether requests come one by one or together; at best
    a step for 8 rows costs what a step for one does, so the 8 clients' decode time shrinks 8x and no
    more. Measured: the same requests sent one at a time asking for one token each.
    """
    _, front_s = sequential(url, [{**b, "max_tokens": 1, "min_tokens": 1} for b in bodies])
    front, per_request = front_s / len(bodies), seq_s / len(bodies)
    decode = max(per_request - front, 0.0)
    return {"front_s_per_request": front, "decode_s_per_request": decode,
            "ceiling": per_request / (front + decode / CLIENTS)}


def run(quick: bool = False) -> dict:
    import httpx
    import torch

    from llavakit.infer.api import Pipeline
    from llavakit.infer.benchmodel import cpu_pressure, bench_model_dir
    from llavakit.model.io import load_model
    from llavakit.serve.app import ServeConfig, create_app

    per_client, tokens = (1, 24) if quick else (2, 64)
    pressure_before = cpu_pressure()
    pipe = Pipeline(load_model(bench_model_dir()), model_id="bench", max_batch_size=CLIENTS)
    rows, runs = [], {}
    with serving(create_app(pipe, ServeConfig(max_batch_size=CLIENTS, batch_wait_ms=20))) as url:
        sequential(url, [request_body(0, 4, True)])  # warm up
        for workload, image in (("image questions", True), ("text chat", False)):
            bodies = [request_body(i, tokens, image) for i in range(CLIENTS * per_client)]
            seq_tokens, seq_s = sequential(url, bodies)
            conc_tokens, conc_s = concurrent(url, bodies)
            runs[workload] = {"sequential_s": seq_s, "concurrent_s": conc_s, "requests": len(bodies)}
            rows.append(row(f"server tokens/s, {CLIENTS} concurrent clients, {workload}", conc_tokens / conc_s, "tok/s",
                            seq_tokens / seq_s, ">= 3x sequential"))
            if image:
                runs[workload].update(ceiling(url, bodies, seq_s))
                rows.append(row(f"{workload}: ceiling of that ratio (free batching of decode)",
                                runs[workload]["ceiling"], "x", goal="(bound; prefill is the same work either way)"))
        health = httpx.get(url + "/health").json()
    result = {"name": NAME, "rows": rows, "cpu_pressure_before": pressure_before, "cpu_pressure_after": cpu_pressure(),
              "runs": runs, "threads": torch.get_num_threads(),
              "tokens_per_request": tokens, "batch_sizes": health["batch_sizes"],
              "image_tokens_per_image": pipe.lm.image_seq_length}
    result["doc"] = doc(result)
    return result


def doc(r: dict) -> str:
    """The notes paragraph docs/performance.md shows under the table (numbers from this run)."""
    image = r["runs"]["image questions"]
    pressure = r["cpu_pressure_after"] or {}
    return (
        "### Server throughput notes\n\n"
        "Image questions are mostly prefill-bound: each carries a 576-token image, and a 600-token prefill (~1 s "
        "here, its matrix products near the machine's peak) costs as much as about 20 decode steps. Long prompts are "
        "prefilled one by one (grouping 600-token prompts cost 8 % more per row: the activations outgrow the caches), "
        "short ones of similar length in one right-padded forward. The batched decode step does the rest: with MKL's "
        "few-row sgemm a step of 8 rows cost 2.4x a step of one, which capped this ratio at ~2.0x; products of several "
        "rows now go through oneDNN with prepacked weights (`prepack_multirow`, `LLAVAKIT_ONEDNN_ROWS=0` turns it "
        "off; it keeps a second copy of the LM weights). The ratio cannot exceed (front + decode) / (front + "
        "decode / 8), where front is a request's HTTP, image, tower and prefill time (measured: the same requests "
        f"asking for one token) and decode its {r['tokens_per_request'] - 1} further one-row steps, because prefill is the same work either way "
        "and a step for 8 rows costs at least what a step for one does. "
        f"This run: front {image['front_s_per_request']:.2f} s and decode {image['decode_s_per_request']:.2f} s per "
        f"request, so the ceiling is {image['ceiling']:.2f}x and the measured ratio is "
        f"{image['sequential_s'] / image['concurrent_s'] / image['ceiling']:.0%} of it. "
        f"{image['requests']} image requests took {image['sequential_s']:.0f} s one at a time and "
        f"{image['concurrent_s']:.0f} s from {CLIENTS} clients; batch sizes seen {r['batch_sizes']}; "
        f"{r['threads']} torch threads; CPU pressure after {pressure.get('avg10', 0):.0f}% (10 s) / {pressure.get('avg60', 0):.0f}% (60 s)."
    )


def main() -> None:
    result = run("--quick" in sys.argv)
    print(table([result]))
    print(f"batch sizes seen: {result['batch_sizes']}")
    print(f"wrote {write_result(result)}")


if __name__ == "__main__":
    main()
