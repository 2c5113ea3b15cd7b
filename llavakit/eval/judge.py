"""An LLM judge behind any OpenAI-compatible chat endpoint, with an on-disk review cache.

The judge sees a written description of the image, the question, the reference answer
(assistant 1) and the model's answer (assistant 2), plus the rule of the question's category.
The rules come from a file in one of two formats (`load_rules`):

- llavakit's own (`judge_rules.json`, packaged and the default): our wording, our layout;
- LLaVA's `llava/eval/table/rule.json` (`{rule key: {role, prompt}}`), which the user downloads:
  the user message is then laid out as LLaVA's GPT review scripts lay it out, with the rule text
  read from that file. That file has no system message (LLaVA's review scripts set one): ours is sent
  unless `JudgeConfig.system` (`--judge-system`) gives one, e.g. the one of LLaVA's scripts for an
  exact replay of their protocol.

The reply's first line must be exactly two grades "s1 s2" (1..10). A failed call or an unreadable
first line raises `JudgeError` naming the question: there is no default score.

Reviews are cached as `<cache_dir>/<key>.json`, key = sha256 of (judge model, question id,
sha256 of the model answer, endpoint and sampling, then only where they differ from the defaults:
the rules file's sha256 (not for the packaged file), the system message's sha256 (only when
`JudgeConfig.system` replaces the file's: with our packaged rules or a LLaVA rule.json, the packaged
message) and the release (not for in-the-wild)). Leaving the defaults out keeps the keys of caches
written before those parts existed. A cached review whose system or user message differs from the
current one (the rules or reference changed) is judged again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from llavakit.eval.common import EvalError, QuestionId
from llavakit.openai_client import ChatClient, ChatError, ChatFatal

# Looser than LLaVA's reader about spaces ("8, 9"), stricter about number forms ("+8", "8."): docs/evaluation.md.
_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[ ,]\s*(\d+(?:\.\d+)?)\s*$")
MIN_SCORE, MAX_SCORE = 1.0, 10.0

PACKAGED_RULES = "llavakit/eval/judge_rules.json (packaged)"
OWN_KEYS = ("system", "instructions", "categories")
"""The top-level keys of llavakit's rules format."""

DEFAULT_RELEASE = "llava-bench-in-the-wild"
"""The release a cache key leaves out (every review cached before the release joined the key was of it)."""

LLAVA_RULE_PREFIX = {"llava-bench-in-the-wild": "llava_bench_", "llava-bench-coco": ""}
"""LLaVA's rule.json key of a question is this prefix of its release + its category: the in-the-wild review
script (eval_gpt_review_bench.py) reads `llava_bench_<category>`, the COCO one (eval_gpt_review_visual.py) the bare
category, whose rules speak of captions and boxes."""

_LEGACY_SYSTEM_SHA256 = "ffd6ff47fa0c2066441bd2195a5a33281becf03ce038181572c2219b895a4b53"
"""sha256 of the packaged system message, the only one sent before cache records carried `system_sha256`."""


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
    rules: Path | None = None
    """Judge rules file (`--judge-rules`): llavakit's format or LLaVA's rule.json; None = the packaged llavakit rules."""
    system: str | None = None
    """The judge's system message (`--judge-system`), in place of the rules file's; None = the file's, and for a
    LLaVA rule.json (which has none: LLaVA's review scripts set their own) the packaged llavakit one."""

    def __post_init__(self) -> None:
        if not self.url or not self.model:
            raise EvalError("the judge needs a URL and a model name (--judge-url, --judge-model)")
        if self.system is not None and not self.system.strip():
            raise EvalError("the judge's system message (--judge-system) is empty")
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
    release: str = DEFAULT_RELEASE
    """The LLaVA-Bench release (`llava_bench.LAYOUTS`); it picks the rule key in a LLaVA rule.json."""
    llava_context: str | None = None
    """What LLaVA's review scripts write under [Context] (`llava_bench.Description.llava`), sent in the LLaVA
    layout only; None: `context` as it is."""


@dataclass(frozen=True)
class Review:
    """The judge's grades of the reference answer and the model answer, and its full reply."""

    question_id: QuestionId
    reference_score: float
    model_score: float
    text: str
    cached: bool


@dataclass(frozen=True)
class JudgeRules:
    """A judge protocol read from a rules file: the system message and the rule per category."""

    source: str
    """The file read, or PACKAGED_RULES."""
    style: Literal["llavakit", "llava"]
    system: str
    rules: dict[str, dict[str, str]]
    """Rule key -> {role, focus} (llavakit) or {role, prompt} (LLaVA's rule.json)."""
    instructions: str
    """llavakit style: the text after the answers, {role} and {focus} filled in per category; empty for llava."""
    digest: str
    """sha256 of the file's bytes."""
    file_system: str
    """The system message the file gives (for a LLaVA rule.json, which has none, the packaged one); `system`
    differs from it when `--judge-system` replaced it."""

    @property
    def packaged(self) -> bool:
        return self.source == PACKAGED_RULES

    def key(self, category: str, release: str) -> str:
        """The rule key of a question's category: the category itself, or LLaVA's key for the release."""
        if self.style == "llavakit":
            return category
        if release not in LLAVA_RULE_PREFIX:
            raise JudgeError(f"{self.source}: no LLaVA rule key is known for release {release!r} "
                             f"(known: {', '.join(LLAVA_RULE_PREFIX)})")
        return LLAVA_RULE_PREFIX[release] + category

    def rule_for(self, category: str, release: str, who: str) -> dict[str, str]:
        """The rule of a category; a JudgeError naming `who`, the file and the missing key if it has none."""
        key = self.key(category, release)
        if key not in self.rules:
            raise JudgeError(f"{who}: no judge rule for category {category!r} in {self.source}: it lacks the key "
                             f"{key!r} (keys: {', '.join(sorted(self.rules))})")
        return self.rules[key]


def load_rules(path: Path | None = None, system: str | None = None) -> JudgeRules:
    """Judge rules from `path` in llavakit's format or LLaVA's rule.json (our packaged file by default), with
    `system` as the system message if given (see JudgeConfig.system)."""
    rules = _read_rules(path)
    return replace(rules, system=system) if system is not None else rules


def _read_rules(path: Path | None) -> JudgeRules:
    if path is None:
        raw, source = resources.files("llavakit.eval").joinpath("judge_rules.json").read_bytes(), PACKAGED_RULES
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"judge rules file not found: {path}")
        raw, source = Path(path).read_bytes(), str(path)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"{source}: judge rules are not a JSON file ({exc})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if isinstance(data, dict) and any(k in data for k in OWN_KEYS):
        return _own_rules(data, source, digest)
    return _llava_rules(data, source, digest)


def _text_fields(entry: Any, keys: tuple[str, ...], where: str) -> dict[str, str]:
    """The entry's `keys`, each a non-empty text, or an EvalError naming `where` and the key."""
    if not isinstance(entry, dict):
        raise EvalError(f"{where} is a {type(entry).__name__}, not an object with {' and '.join(map(repr, keys))}")
    for key in keys:
        if key not in entry:
            raise EvalError(f"{where} lacks {key!r}")
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise EvalError(f"{where}: {key!r} is {entry[key]!r:.60}, not a non-empty text")
    return {key: entry[key] for key in keys}


def _own_rules(data: dict[str, Any], source: str, digest: str) -> JudgeRules:
    """llavakit's format: system, instructions ({role}, {focus}), categories of {role, focus}."""
    top = _text_fields(data, ("system", "instructions"), f"{source} (llavakit judge rules)")
    if "categories" not in data:
        raise EvalError(f"{source} (llavakit judge rules) lacks 'categories' (an object of category: {{role, focus}})")
    categories = data["categories"]
    if not isinstance(categories, dict) or not categories:
        raise EvalError(f"{source}: 'categories' is {categories!r:.60}, not an object of category: {{role, focus}}")
    rules = {c: _text_fields(r, ("role", "focus"), f"{source}: category {c!r}") for c, r in categories.items()}
    try:
        top["instructions"].format(role="", focus="")
    except (KeyError, IndexError, ValueError) as exc:
        raise EvalError(f"{source}: 'instructions' may only use {{role}} and {{focus}} (other braces doubled): "
                        f"{exc!r}") from None
    return JudgeRules(source, "llavakit", top["system"], rules, top["instructions"], digest, top["system"])


def _llava_rules(data: Any, source: str, digest: str) -> JudgeRules:
    """LLaVA's rule.json: {rule key: {role, prompt}}; anything else is neither format."""
    neither = (f"{source}: neither llavakit's judge rules (keys {', '.join(map(repr, OWN_KEYS))}) nor LLaVA's "
               "rule.json (an object of rule key: {role, prompt})")
    if not isinstance(data, dict) or not data:
        raise EvalError(f"{neither}: it is {'an empty object' if data == {} else 'a ' + type(data).__name__}")
    try:
        rules = {k: _text_fields(r, ("role", "prompt"), f"rule {k!r}") for k, r in data.items()}
    except EvalError as exc:
        raise EvalError(f"{neither}: {exc}") from None
    # LLaVA's rule.json holds no system message (its review scripts send their own): ours, unless --judge-system.
    packaged_system = _read_rules(None).system
    return JudgeRules(source, "llava", packaged_system, rules, "", digest, packaged_system)


def build_prompt(rules: JudgeRules, req: ReviewRequest) -> str:
    """The user message of a review: description, question, both answers, then the category's rule."""
    rule = rules.rule_for(req.category, req.release, f"question {req.question_id!r}")
    if rules.style == "llava":
        return _llava_prompt(rule, req)
    role = rule["role"]
    sections = [
        ("Image description", req.context),
        ("Question", req.question),
        (f"Answer of {role} 1", req.reference),
        (f"Answer of {role} 2", req.answer),
    ]
    body = "\n\n".join(f"{title}:\n<<<\n{text.strip()}\n>>>" for title, text in sections)
    return body + "\n\n" + rules.instructions.format(role=role, focus=rule["focus"])


def _llava_prompt(rule: dict[str, str], req: ReviewRequest) -> str:
    """LLaVA's review layout: bracketed section titles, each section followed by a blank line, texts as they are."""
    role = rule["role"]
    context = req.context if req.llava_context is None else req.llava_context
    sections = [
        f"[Context]\n{context}",
        f"[Question]\n{req.question}",
        f"[{role} 1]\n{req.reference}\n\n[End of {role} 1]",
        f"[{role} 2]\n{req.answer}\n\n[End of {role} 2]",
        f"[System]\n{rule['prompt']}",
    ]
    return "".join(section + "\n\n" for section in sections)


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


def protocol_settings(rules: JudgeRules) -> tuple:
    """What of the rules keys a review apart, each part only where it is not the default (so that caches written
    before it joined the key keep theirs): a user's rules file (its sha256, which covers a system message of its
    own) and a system message other than the file's, i.e. `--judge-system` (its sha256, tagged). With the packaged
    rules or a LLaVA rule.json, the file's message is the packaged one."""
    file_part = () if rules.packaged else (rules.digest,)
    system_part = () if rules.system == rules.file_system else (f"system:{sha256(rules.system)}",)
    return file_part + system_part


def release_settings(release: str) -> tuple:
    """The release's part of a cache key: none for in-the-wild, a tagged name for any other (its question ids
    overlap in-the-wild's)."""
    return () if release == DEFAULT_RELEASE else (f"release:{release}",)


class Judge:
    """Reviews answers through the configured endpoint; use as a context manager or call close()."""

    def __init__(self, config: JudgeConfig, rules: JudgeRules | None = None) -> None:
        self.config = config
        self.rules = rules if rules is not None else load_rules(config.rules, config.system)
        # another rules file or system message keys its reviews apart from the default ones (they may share a cache)
        self.settings = judge_settings(config) + protocol_settings(self.rules)
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
        key = cache_key(self.config.model, req.question_id, req.answer, self.settings + release_settings(req.release))
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
        """The cached reply if it answered this exact system and user message."""
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None
        same_system = record.get("system_sha256", _LEGACY_SYSTEM_SHA256) == sha256(self.rules.system)
        return record.get("reply") if same_system and record.get("prompt_sha256") == prompt_hash else None

    def _write_cache(self, path: Path, req: ReviewRequest, prompt_hash: str, reply: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "judge_model": self.config.model,
            "question_id": req.question_id,
            "answer_sha256": sha256(req.answer),
            "system_sha256": sha256(self.rules.system),
            "prompt_sha256": prompt_hash,
            "rules": self.rules.source,
            "reply": reply,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)

    def _chat(self, prompt: str, question_id: QuestionId) -> str:
        """One chat completion through the shared client (transient failures retried there), or a JudgeError."""
        messages = [{"role": "system", "content": self.rules.system}, {"role": "user", "content": prompt}]
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
