"""An LLM judge behind any OpenAI-compatible chat endpoint, with an on-disk review cache.

The judge sees a written description of the image, the question, the reference answer
(assistant 1) and the model's answer (assistant 2), plus the question category's rule from
`judge_rules.json`. Its first line must be exactly two grades "s1 s2" (1..10). A failed call
or an unreadable first line raises `JudgeError` naming the question: there is no default score.

Reviews are cached as `<cache_dir>/<key>.json`, key = sha256 of (judge model, question id,
sha256 of the model answer). A cached review whose prompt differs from the current one (the
rules or reference changed) is judged again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from llavakit.eval.common import EvalError, QuestionId
from llavakit.openai_client import ChatClient, ChatError, ChatFatal

_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[ ,]\s*(\d+(?:\.\d+)?)\s*$")
MIN_SCORE, MAX_SCORE = 1.0, 10.0


class JudgeError(EvalError):
    """A judge call failed or its reply could not be read; the message names the question."""


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to call the judge."""

    url: str
    """Base URL of the OpenAI-compatible API, e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1"."""
    model: str
    cache_dir: Path
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; unset means no Authorization header (local servers)."""
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout: float = 120.0
    retries: int = 2
    """Extra attempts after a timeout, a connection error or a transient HTTP status (408, 409, 429, 5xx)."""
    retry_wait: float = 2.0
    """First wait before a retry, in seconds; doubles per retry (with jitter), a Retry-After header wins."""
    retry_wait_max: float = 60.0
    """Longest wait between retries (a server's Retry-After is honoured up to 300 s)."""

    def __post_init__(self) -> None:
        if not self.url or not self.model:
            raise EvalError("the judge needs a URL and a model name (--judge-url, --judge-model)")
        if self.retries < 0 or self.retry_wait < 0 or self.retry_wait_max < 0:
            raise EvalError(f"judge retries, retry_wait and retry_wait_max must be >= 0, got "
                            f"{self.retries}, {self.retry_wait}, {self.retry_wait_max}")


@dataclass(frozen=True)
class ReviewRequest:
    """What the judge is shown for one question."""

    question_id: QuestionId
    category: str
    context: str
    question: str
    reference: str
    answer: str


@dataclass(frozen=True)
class Review:
    """The judge's grades of the reference answer and the model answer, and its full reply."""

    question_id: QuestionId
    reference_score: float
    model_score: float
    text: str
    cached: bool


def load_rules(path: Path | None = None) -> dict[str, Any]:
    """The judge rules (system text, instructions, per-category role and focus); our packaged file by default."""
    if path is None:
        text = resources.files("llavakit.eval").joinpath("judge_rules.json").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    rules = json.loads(text)
    for key in ("system", "instructions", "categories"):
        if key not in rules:
            raise EvalError(f"judge rules lack {key!r}")
    return rules


def build_prompt(rules: dict[str, Any], req: ReviewRequest) -> str:
    """The user message of a review: description, question, both answers, then the category's rule."""
    rule = rules["categories"].get(req.category)
    if rule is None:
        known = ", ".join(sorted(rules["categories"]))
        raise JudgeError(f"question {req.question_id!r}: no judge rule for category {req.category!r} (known: {known})")
    role = rule["role"]
    sections = [
        ("Image description", req.context),
        ("Question", req.question),
        (f"Answer of {role} 1", req.reference),
        (f"Answer of {role} 2", req.answer),
    ]
    body = "\n\n".join(f"{title}:\n<<<\n{text.strip()}\n>>>" for title, text in sections)
    return body + "\n\n" + rules["instructions"].format(role=role, focus=rule["focus"])


def parse_scores(reply: str, question_id: QuestionId) -> tuple[float, float]:
    """The two grades on the reply's first line, strictly "s1 s2" (a comma also separates), each in 1..10."""
    first = reply.split("\n", 1)[0]
    m = _SCORES.match(first)
    if not m:
        raise JudgeError(f"question {question_id!r}: judge reply's first line is not two grades: {first[:120]!r}")
    s1, s2 = float(m.group(1)), float(m.group(2))
    if not (MIN_SCORE <= s1 <= MAX_SCORE and MIN_SCORE <= s2 <= MAX_SCORE):
        raise JudgeError(f"question {question_id!r}: judge grades {s1:g} {s2:g} are outside 1..10")
    return s1, s2


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(judge_model: str, question_id: QuestionId, answer: str, settings: tuple = ()) -> str:
    """The cache file stem for (judge model, question id, model answer, the judge's endpoint and sampling)."""
    return sha256(json.dumps([judge_model, str(question_id), sha256(answer), *settings]))


def judge_settings(config: JudgeConfig) -> tuple:
    """What besides the model decides a review: where it is served (another server's "gpt-4" is another judge)
    and how it samples."""
    return (config.url.rstrip("/"), config.temperature, config.max_tokens)


class Judge:
    """Reviews answers through the configured endpoint; use as a context manager or call close()."""

    def __init__(self, config: JudgeConfig, rules: dict[str, Any] | None = None) -> None:
        self.config = config
        self.rules = rules if rules is not None else load_rules()
        self.client = ChatClient(config.url, config.model, key_env=config.api_key_env or None,
                                 timeout=config.timeout, max_retries=config.retries, backoff=config.retry_wait,
                                 backoff_max=config.retry_wait_max, concurrency=1)

    @property
    def calls(self) -> int:
        """Requests sent to the judge so far (retries included)."""
        return self.client.requests

    def __enter__(self) -> Judge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def review(self, req: ReviewRequest) -> Review:
        """Grades for one question, from the cache when it holds this exact review."""
        prompt = build_prompt(self.rules, req)
        key = cache_key(self.config.model, req.question_id, req.answer, judge_settings(self.config))
        path = Path(self.config.cache_dir) / f"{key}.json"
        cached = self._read_cache(path, sha256(prompt))
        if cached is not None:
            s1, s2 = parse_scores(cached, req.question_id)
            return Review(req.question_id, s1, s2, cached, cached=True)
        reply = self._chat(prompt, req.question_id)
        s1, s2 = parse_scores(reply, req.question_id)
        self._write_cache(path, req, sha256(prompt), reply)
        return Review(req.question_id, s1, s2, reply, cached=False)

    def _read_cache(self, path: Path, prompt_hash: str) -> str | None:
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None
        return record.get("reply") if record.get("prompt_sha256") == prompt_hash else None

    def _write_cache(self, path: Path, req: ReviewRequest, prompt_hash: str, reply: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "judge_model": self.config.model,
            "question_id": req.question_id,
            "answer_sha256": sha256(req.answer),
            "prompt_sha256": prompt_hash,
            "reply": reply,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def _chat(self, prompt: str, question_id: QuestionId) -> str:
        """One chat completion through the shared client (transient failures retried there), or a JudgeError."""
        messages = [{"role": "system", "content": self.rules["system"]}, {"role": "user", "content": prompt}]
        try:
            done = self.client.complete(messages, temperature=self.config.temperature,
                                        max_tokens=self.config.max_tokens)
        except ChatError as exc:
            raise JudgeError(f"question {question_id!r}: {_describe(exc)}") from None
        return done.text


def _describe(exc: ChatError) -> str:
    """What went wrong with a judge call, in words."""
    if isinstance(exc, ChatFatal):
        return f"judge {exc.message}"
    if exc.status is not None:
        return f"judge returned HTTP {exc.status}: {exc.message}"
    if exc.code == "malformed_body":
        return f"judge response is {exc.message}"
    return f"judge call to {exc.endpoint} failed: {exc.message}"
