"""One client for OpenAI-compatible chat completions endpoints, shared by the datagen `openai` teacher
and the eval judge (a neutral module: either stage may import it, it imports neither).

`ChatClient(url, model, ...).complete(messages, ...)` POSTs `{url}/chat/completions` with `{"model",
"messages", "temperature", "max_tokens"}` and returns a `Completion` (text, finish_reason):

- the API key comes from `api_key`, else from the environment variable `key_env`; none means no
  Authorization header (local servers);
- a timeout per request; at most `concurrency` requests in flight (a semaphore shared by all threads);
- retries with exponential backoff (`backoff` seconds doubling, capped at `backoff_max`, times a jitter
  in [0.5, 1.5)) on timeouts, connection errors and the transient statuses 408, 409, 429 and 5xx (the
  set the official OpenAI client retries); a `Retry-After` header (seconds or HTTP date) is honoured,
  up to 300 s;
- 401/403/404 raise `ChatFatal` (wrong key, URL or model: retrying cannot help);
- any other failure raises `ChatError` with a short `code` (`timeout`, `connection_error`, `http_<status>`,
  `malformed_body`), the HTTP `status` when there was one, and a message naming the endpoint's reply.

Callers turn these into their own errors (the teacher's counted rejections, the judge's per-question
errors) and decide what a `finish_reason` of "length" means to them.
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

RETRY_AFTER_MAX = 300.0
TRANSIENT_STATUS = frozenset({408, 409, 429})
"""Retried besides every 5xx."""
FATAL_STATUS = frozenset({401, 403, 404})


class ChatError(Exception):
    """A chat completion failed; `code` says how (timeout, connection_error, http_<status>, malformed_body)."""

    def __init__(self, code: str, message: str, *, status: int | None = None, endpoint: str = "", reply: str = ""):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status, self.endpoint = code, message, status, endpoint
        self.reply = reply
        """The first 200 characters of the endpoint's reply body, when there was one."""


class ChatFatal(ChatError):
    """401/403/404: the key, the URL or the model is wrong; no request can succeed."""


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str | None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def is_transient(status: int) -> bool:
    return status in TRANSIENT_STATUS or status >= 500


def _excerpt(resp) -> str:
    return resp.text[:200].replace("\n", " ")


class ChatClient:
    """Chat completions against one endpoint and model; thread-safe; close() (or `with`) when done."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        concurrency: int = 4,
    ):
        import httpx

        if max_retries < 0 or backoff < 0 or backoff_max < 0:
            raise ValueError(f"max_retries, backoff and backoff_max must be >= 0, got "
                             f"{max_retries}, {backoff}, {backoff_max}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._httpx = httpx
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.key_env = model, key_env
        self.max_retries, self.backoff, self.backoff_max = max_retries, backoff, backoff_max
        self.requests = 0
        """HTTP requests sent so far (every attempt, retries included)."""
        self._sem = threading.BoundedSemaphore(concurrency)
        self._lock = threading.Lock()
        self._rng = random.Random()
        key = api_key or (os.environ.get(key_env) if key_env else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout), headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def complete(self, messages: list[dict], *, temperature: float, max_tokens: int,
                 on_retry: Callable[[str], None] | None = None) -> Completion:
        """One completion; transient failures retried (`on_retry(code)` before each retry), then ChatError."""
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        for retry in range(self.max_retries + 1):
            result = self._attempt(body)
            if isinstance(result, Completion):
                return result
            error, retry_after = result
            if retry == self.max_retries:
                break
            if on_retry is not None:
                on_retry(error.code)
            time.sleep(self.delay(retry, retry_after))
        raise ChatError(error.code, f"{error.message} (gave up after {self.max_retries + 1} attempts)",
                        status=error.status, endpoint=self.endpoint, reply=error.reply)

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_MAX)
        with self._lock:
            jitter = 0.5 + self._rng.random()
        return min(self.backoff_max, self.backoff * (2**retry)) * jitter

    def _attempt(self, body: dict) -> Completion | tuple[ChatError, float | None]:
        """One request: a Completion, or (a transient error, Retry-After); raises on a final failure."""
        httpx = self._httpx
        with self._lock:
            self.requests += 1
        with self._sem:
            try:
                resp = self._client.post(self.endpoint, json=body)
            except httpx.TimeoutException as exc:
                return self._error("timeout", f"no response within the timeout ({type(exc).__name__})"), None
            except httpx.HTTPError as exc:
                return self._error("connection_error", f"{type(exc).__name__}: {exc}"), None
        if resp.status_code == 200:
            return self._completion(resp)
        status, excerpt = resp.status_code, _excerpt(resp)
        if status in FATAL_STATUS:
            raise ChatFatal(f"http_{status}", self._fatal_hint(status, excerpt), status=status,
                            endpoint=self.endpoint, reply=excerpt)
        error = self._error(f"http_{status}", excerpt, status, reply=excerpt)
        if not is_transient(status):
            raise error
        return error, parse_retry_after(resp.headers.get("Retry-After"))

    def _error(self, code: str, message: str, status: int | None = None, reply: str = "") -> ChatError:
        return ChatError(code, message, status=status, endpoint=self.endpoint, reply=reply)

    def _fatal_hint(self, status: int, excerpt: str) -> str:
        head = f"{self.endpoint} answered {status} ({excerpt!r}); "
        if status == 404:
            return head + f"check the base URL (most servers' ends in /v1) and the model name {self.model!r}"
        return head + (f"check the API key in ${self.key_env}" if self.key_env else "check the API key")

    def _completion(self, resp) -> Completion:
        excerpt = _excerpt(resp)
        try:
            choice = resp.json()["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._error("malformed_body", f"not a chat completion: {excerpt!r}", reply=excerpt) from None
        if not isinstance(content, str):
            raise self._error("malformed_body", f"message content is {type(content).__name__}: {excerpt!r}",
                              reply=excerpt)
        return Completion(content, choice.get("finish_reason"))
