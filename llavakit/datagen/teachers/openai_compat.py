"""The `openai` teacher: any OpenAI-compatible chat completions endpoint.

The HTTP work — key, timeout, bounded concurrency, retries with exponential backoff + jitter on
408/409/429/5xx, timeouts and connection errors, `Retry-After` — is `llavakit.openai_client.ChatClient`,
shared with the eval judge. Here its outcomes become the teacher's:

- 200 with a usable body            -> the text;
- 200 with a malformed body         -> TeacherError("malformed_body")  (counted rejection, no retry);
- finish_reason == "length"         -> TeacherError("truncated");
- 400/413/422 (e.g. context too long) -> TeacherError("http_4xx");
- 401/403/404                       -> TeacherFatal (wrong key, URL or model: the whole run stops);
- retries exhausted                 -> TeacherError("timeout" | "http_5xx" | "http_429" | "connection_error").
"""

from __future__ import annotations

import os
from typing import Any

from llavakit.datagen.teachers import RetryHook, TeacherError, TeacherFatal
from llavakit.openai_client import ChatClient, ChatError, ChatFatal


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
        self.url = url.rstrip("/")
        self.model = model
        self.max_concurrency = concurrency
        self.temperature, self.max_tokens = temperature, max_tokens
        self.key_env = key_env
        self._on_retry = on_retry or (lambda kind, code: None)
        # the key is what the caller passed: from_config reads $key_env, a direct caller decides itself
        self.client = ChatClient(self.url, model, api_key=api_key, key_env=None, timeout=timeout,
                                 max_retries=max_retries, backoff=backoff, backoff_max=backoff_max,
                                 concurrency=concurrency)

    @classmethod
    def from_config(cls, config, *, dataset=None, on_retry: RetryHook | None = None) -> OpenAITeacher:
        return cls(
            config.url, config.model, api_key=os.environ.get(config.key_env) or None,
            concurrency=config.concurrency, timeout=config.timeout, max_retries=config.max_retries,
            backoff=config.backoff, backoff_max=config.backoff_max, temperature=config.temperature,
            max_tokens=config.max_tokens, on_retry=on_retry, key_env=config.key_env,
        )

    @property
    def settings(self) -> dict:
        """Sampling settings that change its outputs (part of the cache key)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}

    def close(self) -> None:
        self.client.close()

    def complete(self, messages: list[dict], *, kind: str, image_id: Any, attempt: int = 0) -> str:
        try:
            done = self.client.complete(messages, temperature=self.temperature, max_tokens=self.max_tokens,
                                        on_retry=lambda code: self._on_retry(kind, code))
        except ChatFatal as exc:
            raise TeacherFatal(self._fatal_message(exc)) from None
        except ChatError as exc:
            raise TeacherError(exc.code, exc.message) from None
        if done.finish_reason == "length":
            raise TeacherError("truncated", "the completion hit max_tokens (finish_reason=length)")
        return done.text

    def _fatal_message(self, exc: ChatFatal) -> str:
        head = f"{exc.endpoint} answered {exc.status} ({exc.reply!r}); "
        if exc.status == 404:
            return head + (f"check --teacher-url (it should end in /v1 for most servers) and "
                           f"--teacher-model {self.model!r}")
        return head + f"check the API key in ${self.key_env}"
