"""The HTTP server: OpenAI-compatible `/v1/chat/completions` (+ SSE streaming), `/v1/models`,
`/health`, and a chat page at `/`.

Every bad input is answered with a 4xx and OpenAI's error body naming the field at fault; the
model runs on one worker thread (`worker.py`) that batches concurrent requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Request  # module level: FastAPI resolves the handlers' string annotations here

from llavakit.data.images import ImageError, ImageLimits, decode_image
from llavakit.infer.params import SamplingParams
from llavakit.infer.prompt import PromptError
from llavakit.serve.images import ImageSources, ImageURLError, image_bytes
from llavakit.serve.protocol import (APIError, ChatRequest, chunk_body, completion_body, completion_id,
                                     parse_request, to_messages, usage)
from llavakit.serve.worker import BatchWorker, GenerationError, Job, QueueFullError


@dataclass
class ServeConfig:
    """Server limits and switches (the `llavakit serve` options)."""

    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    batch_wait_ms: float = 5.0
    max_images: int = 4
    """Images per request."""
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 16_000_000
    default_max_tokens: int = 512
    images: ImageSources = field(default_factory=ImageSources)


def create_app(pipeline, config: ServeConfig | None = None):
    """A FastAPI app serving `pipeline`; the batch worker starts and stops with the app."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    config = config or ServeConfig()
    worker = BatchWorker(pipeline.engine, config.max_batch_size, config.max_queue, config.batch_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        await worker.start()
        yield
        await worker.stop()

    app = FastAPI(title="llavakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pipeline, app.state.config, app.state.worker = pipeline, config, worker
    _error_handlers(app)
    _routes(app, pipeline, config, worker)
    return app


def _error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse(APIError(400, f"invalid request: {exc.errors()[:3]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        logging.getLogger("llavakit.serve").error("internal error on %s", request.url.path, exc_info=exc)
        body = APIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                        type_="server_error").body()  # not the exception text: it may hold paths or data
        return JSONResponse(body, status_code=500)


def _routes(app, pipeline, config: ServeConfig, worker: BatchWorker) -> None:
    from fastapi.responses import HTMLResponse

    page = resources.files("llavakit.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    @app.get("/health")
    async def health():
        s = worker.stats
        return {"status": "ok", "model": pipeline.model_id, "queued": worker.queued, "max_queue": config.max_queue,
                "batches": s.batches, "requests": s.requests, "max_batch_seen": s.max_batch_seen,
                "batch_sizes": s.batch_sizes, "generated_tokens": s.tokens, "cancelled": s.cancelled,
                "busy_seconds": round(s.busy_seconds, 3)}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request, config)
        return {"object": "list", "data": [
            {"id": pipeline.model_id, "object": "model", "created": int(time.time()), "owned_by": "llavakit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request, config)
        req = parse_request(await read_json(request, config.max_body_bytes))
        if req.model != pipeline.model_id:
            raise APIError(404, f"model {req.model!r} not found; this server serves {pipeline.model_id!r}",
                           param="model", code="model_not_found")
        if worker.queued >= config.max_queue:  # before fetching and decoding images for nothing
            raise _queue_full(f"the request queue is full ({config.max_queue} waiting); retry later")
        job = await make_job(req, pipeline, config)
        try:
            worker.submit(job)
        except QueueFullError as exc:  # filled up while this request's images were read
            raise _queue_full(str(exc)) from None
        if req.stream:
            return _stream_response(req, job, pipeline.model_id, worker)
        return await _full_response(request, job, pipeline.model_id, worker)


def _queue_full(message: str) -> APIError:
    return APIError(503, message, code="queue_full", type_="server_error", headers={"Retry-After": "1"})


def check_auth(request, config: ServeConfig) -> None:
    if not config.api_key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
        raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                       code="invalid_api_key", type_="authentication_error")


async def read_json(request, limit: int) -> object:
    """The request body as JSON: 413 past `limit` bytes (declared or streamed), 400 if not JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None


def sampling_params(req: ChatRequest, prompt_tokens: int, max_positions: int, default_max_tokens: int) -> SamplingParams:
    """OpenAI's sampling fields; temperature defaults to 1.0 as in OpenAI's API."""
    room = max_positions - prompt_tokens
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > room:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {asked}, but the model's context is "
                            f"{max_positions}; ask for at most {room}", param="max_tokens", code="context_length_exceeded")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    temperature = 1.0 if req.temperature is None else req.temperature
    max_new = asked or min(default_max_tokens, room)
    if (req.min_tokens or 0) > max_new:
        raise APIError(400, f"min_tokens ({req.min_tokens}) is more than max_tokens ({max_new})", param="min_tokens")
    try:
        return SamplingParams(max_new, temperature, req.top_p or 1.0, req.top_k or 0, req.seed, stop, req.min_tokens or 0)
    except ValueError as exc:  # SamplingParams' messages start with the field's name, the API's for these
        field_name = str(exc).split(" ", 1)[0]
        raise APIError(400, str(exc), param=field_name if field_name in SAMPLING_FIELDS else None) from None


SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed", "stop")


async def make_job(req: ChatRequest, pipeline, config: ServeConfig) -> Job:
    """Fetch and decode images, render the prompt, build the engine row: every 4xx is raised here."""
    from starlette.concurrency import run_in_threadpool

    messages, refs = to_messages(req)
    if len(refs) > config.max_images:
        raise APIError(400, f"{len(refs)} images in the request; the limit is {config.max_images}", param="messages",
                       code="too_many_images")
    try:
        blobs = [await image_bytes(url, where, config.images) for url, where in refs]
    except ImageURLError as exc:
        raise APIError(400, str(exc), code="invalid_image_url") from None
    return await run_in_threadpool(_build_job, req, messages, blobs, pipeline, config)


def _build_job(req: ChatRequest, messages: list[dict], blobs: list, pipeline, config: ServeConfig) -> Job:
    limits = ImageLimits(max_pixels=config.max_image_pixels, max_bytes=config.images.max_bytes)
    try:
        images = [decode_image(data, name, limits) for data, name in blobs]
    except ImageError as exc:
        raise APIError(400, str(exc), code="invalid_image") from None
    try:
        prompt = pipeline.prompt(images, messages)
    except PromptError as exc:
        code = "context_length_exceeded" if "context" in str(exc) else "invalid_messages"
        raise APIError(400, str(exc), param="messages", code=code) from None
    params = sampling_params(req, len(prompt.ids), pipeline.max_positions, config.default_max_tokens)
    return Job(pipeline.row(prompt, params), len(prompt.ids))


async def _full_response(request, job: Job, model_id: str, worker: BatchWorker):
    from fastapi.responses import JSONResponse

    text, finish = [], "stop"
    watch = asyncio.create_task(_cancel_when_gone(request, job))
    try:
        async for piece, end in worker.results(job):
            text.append(piece)
            finish = end or finish
    except GenerationError as exc:
        raise APIError(500, str(exc), type_="server_error") from None
    finally:
        watch.cancel()
    body = completion_body(completion_id(), model_id, "".join(text), _finish(finish), job.prompt_tokens,
                           len(job.row.generated))
    return JSONResponse(body)


async def _cancel_when_gone(request, job: Job, every_s: float = 0.25) -> None:
    """Cancel `job` once its client disconnects: uvicorn tells only streaming responses (they write), so a
    non-streaming one polls; the row then leaves its batch at the next decode step."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(every_s)


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream_response(req: ChatRequest, job: Job, model_id: str, worker: BatchWorker):
    from fastapi.responses import StreamingResponse

    cid = completion_id()
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events():
        yield _sse(chunk_body(cid, model_id, {"role": "assistant", "content": ""}))
        try:
            async for piece, end in worker.results(job):
                if piece:
                    yield _sse(chunk_body(cid, model_id, {"content": piece}))
                if end is not None:
                    yield _sse(chunk_body(cid, model_id, {}, _finish(end)))
            if include_usage:
                yield _sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
                            "choices": [], "usage": usage(job.prompt_tokens, len(job.row.generated))})
        except GenerationError as exc:  # reported in-band: the status line is already sent; the text is in the log
            yield _sse(APIError(500, str(exc), type_="server_error").body())
        except Exception as exc:  # noqa: BLE001 - as above, for anything else
            logging.getLogger("llavakit.serve").error("streaming failed", exc_info=exc)
            yield _sse(APIError(500, f"internal error ({type(exc).__name__}); the server log has the details",
                                type_="server_error").body())
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
