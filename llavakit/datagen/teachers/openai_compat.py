"""The `openai` teacher: any OpenAI-compatible chat completions endpoint.

POST `{url}/chat/completions` with `{"model", "messages", "temperature", "max_tokens"}`.
Bounded concurrency (a semaphore around requests, shared by all caller threads), a timeout per
request, retries with exponential backoff + jitter on 429 / 5xx / timeouts / connection errors
(a `Retry-After` header is honoured), and clear outcomes:

- 200 with a usable body            -> the text;
- 200 with a malformed body         -> TeacherError("malformed_body")  (counted rejection, no retry);
- finish_reason == "length"         -> TeacherError("truncated");
- 400/413/422 (e.g. context too long) -> TeacherError("http_4xx");
- 401/403/404                       -> TeacherFatal (wrong key, URL or model: the whole run stops);
- retries exhausted                 -> TeacherError("timeout" | "http_5xx" | "http_429" | "connection_error").
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from typing import Any

from llavakit.datagen.teachers import RetryHook, TeacherError, TeacherFatal

RETRY_AFTER_MAX = 300.0


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


class OpenAITeacher:
    name = "openai"
    deterministic = False

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
        temperature: float = 0.7,
        max_tokens: int = 1024,
        on_retry: RetryHook | None = None,
        key_env: str = "OPENAI_API_KEY",
    ):
        import httpx

        self._httpx = httpx
        self.url = url.rstrip("/")
        self.model = model
        self.max_concurrency = concurrency
        self.max_retries = max_retries
        self.backoff, self.backoff_max = backoff, backoff_max
        self.temperature, self.max_tokens = temperature, max_tokens
        self.key_env = key_env
        self._on_retry = on_retry or (lambda kind, code: None)
        self._sem = threading.BoundedSemaphore(concurrency)
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout),
            headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    @classmethod
    def from_config(cls, config, *, dataset=None, on_retry: RetryHook | None = None) -> OpenAITeacher:
        return cls(
            config.url, config.model, api_key=os.environ.get(config.key_env) or None,
            concurrency=config.concurrency, timeout=config.timeout, max_retries=config.max_retries,
            backoff=config.backoff, backoff_max=config.backoff_max, temperature=config.temperature,
            max_tokens=config.max_tokens, on_retry=on_retry, key_env=config.key_env,
        )

    def close(self) -> None:
        self._client.close()

    def _delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_MAX)
        with self._rng_lock:
            jitter = 0.5 + self._rng.random()
        return min(self.backoff_max, self.backoff * (2**retry)) * jitter

    def complete(self, messages: list[dict], *, kind: str, image_id: Any, attempt: int = 0) -> str:
        httpx = self._httpx
        body = {"model": self.model, "messages": messages, "temperature": self.temperature,
                "max_tokens": self.max_tokens}
        endpoint = f"{self.url}/chat/completions"
        last = ("", "")
        for retry in range(self.max_retries + 1):
            retry_after = None
            with self._sem:
                try:
                    resp = self._client.post(endpoint, json=body)
                except httpx.TimeoutException as exc:
                    last = ("timeout", f"no response within the timeout ({type(exc).__name__})")
                except httpx.TransportError as exc:
                    last = ("connection_error", f"{type(exc).__name__}: {exc}")
                else:
                    status = resp.status_code
                    if status == 200:
                        return self._content(resp)
                    excerpt = resp.text[:200].replace("\n", " ")
                    if status in (401, 403):
                        raise TeacherFatal(
                            f"{endpoint} answered {status} ({excerpt!r}); check the API key in ${self.key_env}"
                        )
                    if status == 404:
                        raise TeacherFatal(
                            f"{endpoint} answered 404 ({excerpt!r}); check --teacher-url (it should end in /v1 "
                            f"for most servers) and --teacher-model {self.model!r}"
                        )
                    if status == 429 or status >= 500:
                        last = (f"http_{status}", excerpt)
                        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    else:
                        raise TeacherError(f"http_{status}", excerpt)
            if retry == self.max_retries:
                break
            self._on_retry(kind, last[0])
            time.sleep(self._delay(retry, retry_after))
        code, message = last
        raise TeacherError(code, f"{message} (gave up after {self.max_retries + 1} attempts)")

    @staticmethod
    def _content(resp) -> str:
        excerpt = resp.text[:200].replace("\n", " ")
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TeacherError("malformed_body", f"not a chat completion: {excerpt!r}") from None
        if not isinstance(content, str):
            raise TeacherError("malformed_body", f"message content is {type(content).__name__}: {excerpt!r}")
        if choice.get("finish_reason") == "length":
            raise TeacherError("truncated", "the completion hit max_tokens (finish_reason=length)")
        return content
