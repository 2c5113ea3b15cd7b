"""Prompt packs and instruction lists (JSON data files under `llavakit/datagen/prompts/`).

A prompt pack (`conversation.json`, `detail.json`, `reasoning.json`)::

    {"version": "1", "kind": "conversation",
     "context": "captions" | "captions+boxes",     # what the teacher is shown
     "format": "qa" | "prose",                      # what it must answer with
     "min_pairs": 2, "max_pairs": 10, "min_chars": 1, "max_chars": 1200,   # validation limits
     "system": "...",
     "fewshot": [{"context": "...", "response": "..."}, ...]}

The teacher sees: system message, then for each few-shot example a user message (its context)
and an assistant message (its response), then a user message with the image's context.
Few-shot responses must pass the pack's own validation (checked at load time).

Instruction lists (`detail_questions.json`, `brief_questions.json`): `{"version", "prompts": [...]}`.

`--prompt-dir DIR` overrides: a file of the same name in DIR replaces the built-in one.
A pack's cache identity is `version` plus a hash of its content, so editing a pack without
bumping the version still invalidates the cache for that kind.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llavakit.datagen.parse import Rejected, Rules, parse_output

BUILTIN_DIR = Path(__file__).parent / "prompts"
CONTEXTS = ("captions", "captions+boxes")
FORMATS = ("qa", "prose")


class PackError(ValueError):
    """A prompt pack or instruction list that cannot be used; the message names the file."""


@dataclass(frozen=True)
class PromptPack:
    kind: str
    version: str
    sha: str
    """First 12 hex digits of the sha256 of the pack's canonical JSON."""
    system: str
    fewshot: tuple[tuple[str, str], ...]
    context: str
    rules: Rules
    path: str

    @property
    def cache_version(self) -> str:
        return f"{self.version}+{self.sha}"

    def messages(self, context: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}]
        for ctx, resp in self.fewshot:
            msgs.append({"role": "user", "content": ctx})
            msgs.append({"role": "assistant", "content": resp})
        msgs.append({"role": "user", "content": context})
        return msgs


def _find(name: str, prompt_dir: Path | None) -> Path:
    if prompt_dir is not None and (prompt_dir / name).is_file():
        return prompt_dir / name
    return BUILTIN_DIR / name


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PackError(f"prompt file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise PackError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise PackError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise PackError(f"{path}: expected a JSON object")
    return data


def _sha(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def load_pack(kind: str, prompt_dir: Path | None = None) -> PromptPack:
    path = _find(f"{kind}.json", prompt_dir)
    data = _read(path)

    def need(key: str, typ: type | tuple[type, ...]):
        if key not in data:
            raise PackError(f"{path}: missing {key!r}")
        if not isinstance(data[key], typ) or isinstance(data[key], bool):
            raise PackError(f"{path}: {key!r} must be {getattr(typ, '__name__', typ)}, got {type(data[key]).__name__}")
        return data[key]

    version = need("version", (str, int))
    system = need("system", str)
    if not str(version).strip() or not system.strip():
        raise PackError(f"{path}: 'version' and 'system' must not be empty")
    if data.get("kind", kind) != kind:
        raise PackError(f"{path}: this pack is for kind {data['kind']!r}, not {kind!r}")
    context = data.get("context", "captions+boxes")
    if context not in CONTEXTS:
        raise PackError(f"{path}: 'context' must be one of {', '.join(CONTEXTS)}, got {context!r}")
    fmt = data.get("format", "prose" if kind == "detail" else "qa")
    if fmt not in FORMATS:
        raise PackError(f"{path}: 'format' must be one of {', '.join(FORMATS)}, got {fmt!r}")
    limits = {}
    for key, default in (("min_pairs", 1), ("max_pairs", 10), ("min_chars", 1), ("max_chars", 2000)):
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PackError(f"{path}: {key!r} must be a positive integer, got {value!r}")
        limits[key] = value
    if limits["min_pairs"] > limits["max_pairs"]:
        raise PackError(f"{path}: min_pairs ({limits['min_pairs']}) > max_pairs ({limits['max_pairs']})")
    rules = Rules(format=fmt, **limits)
    fewshot = []
    for i, ex in enumerate(need("fewshot", list)):
        if not (isinstance(ex, dict) and isinstance(ex.get("context"), str) and isinstance(ex.get("response"), str)):
            raise PackError(f"{path}: fewshot[{i}] must be {{'context': str, 'response': str}}")
        try:
            parse_output(ex["response"], rules)
        except Rejected as exc:
            raise PackError(f"{path}: fewshot[{i}] response fails the pack's own validation: {exc}") from None
        fewshot.append((ex["context"], ex["response"]))
    return PromptPack(kind=kind, version=str(version), sha=_sha(data), system=system, fewshot=tuple(fewshot),
                      context=context, rules=rules, path=str(path))


@dataclass(frozen=True)
class InstructionList:
    name: str
    version: str
    prompts: tuple[str, ...]
    path: str


def load_list(name: str, prompt_dir: Path | None = None) -> InstructionList:
    """`detail_questions` or `brief_questions`."""
    path = _find(f"{name}.json", prompt_dir)
    data = _read(path)
    prompts = data.get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise PackError(f"{path}: 'prompts' must be a non-empty list of non-empty strings")
    if any("<image>" in p for p in prompts):
        raise PackError(f"{path}: prompts must not contain <image> (it is placed automatically)")
    return InstructionList(name=name, version=str(data.get("version", "1")), prompts=tuple(p.strip() for p in prompts),
                           path=str(path))
