"""The OpenAI chat-completions wire format: request validation, message conversion, response bodies."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llavakit.data.templates import IMAGE_TOKEN


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type_, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    """`developer` is OpenAI's newer name for `system` (and is treated as one)."""
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


MAX_STOP = 4
"""Stop strings per request (OpenAI's limit; each is checked after every token)."""
MAX_STOP_CHARS = 256


class ChatRequest(BaseModel):
    """The fields llavakit honours; other OpenAI fields (tools, response_format, logprobs, penalties, ...) are
    accepted and ignored (docs/inference.md lists them)."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_tokens: int | None = Field(default=None, ge=0)
    """Extension (as in vLLM): no EOS before this many tokens."""
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


def parse_request(data: object) -> ChatRequest:
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise APIError(400, "invalid request: " + _describe(exc)) from None
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters", param="stop")
    return req


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        parts.append(f"{loc or 'body'}: {err['msg']}")
    return "; ".join(parts)


def to_messages(req: ChatRequest) -> tuple[list[dict], list[tuple[str, str]]]:
    """llavakit messages (`<image>` markers in place of image parts) and the (url, field) of each image, in order."""
    messages, images = [], []
    for i, m in enumerate(req.messages):
        content = m.content if m.content is not None else ""
        role = "system" if m.role == "developer" else m.role
        if isinstance(content, str):
            _no_marker(content, f"messages[{i}].content")
            messages.append({"role": role, "content": content})
            continue
        text = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, f"{where}: a text part needs 'text'", param=where)
                _no_marker(part.text, where)
                text.append(part.text)
            else:
                if role != "user":
                    raise APIError(400, f"{where}: images may only be sent in user messages", param=where)
                if part.image_url is None:
                    raise APIError(400, f"{where}: an image_url part needs 'image_url'", param=where)
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                images.append((url, f"{where}.image_url"))
                text.append(f"{IMAGE_TOKEN}\n")  # as the template renders list content: '<image>\n' per image
        messages.append({"role": role, "content": "".join(text)})
    return messages, images


def _no_marker(text: str, where: str) -> None:
    if IMAGE_TOKEN in text:
        raise APIError(400, f"{where}: text may not contain the reserved token {IMAGE_TOKEN!r}; send images as image_url parts",
                       param=where)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(cid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
