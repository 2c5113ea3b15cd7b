"""The one render function: a LLaVA record -> (input_ids, labels), for every template.

How: the template's Jinja renders growing prefixes of the conversation. An assistant turn is
the text between "everything before it + generation prompt" and "everything up to and including
it"; that span is trained, everything else gets -100. The full string is tokenized once with
offsets, and each token is labelled by the span it falls in. A token that straddles a span
boundary, a prefix that does not extend, or an image-token count that is off raises
`RecordError` with the record id — labels are never silently zeroed.

`<image>` markers are expanded to `image_seq_length` image tokens here, at data time; the model
scatters the projected features into exactly those positions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import lru_cache

from llavakit.data.records import Conversation, RecordError, parse_record
from llavakit.data.templates import IMAGE_TOKEN, ChatTemplate

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RenderOptions:
    """How a record becomes tokens."""

    image_seq_length: int
    """Image tokens per `<image>` marker (e.g. 576 for CLIP ViT-L/14-336 without CLS)."""
    max_length: int | None = None
    """Longest allowed sequence; longer records raise unless `truncate` is set."""
    truncate: bool = False
    """Cut over-long records at `max_length` (never inside image tokens)."""

    def __post_init__(self) -> None:
        if self.image_seq_length <= 0:
            raise ValueError(f"image_seq_length must be > 0, got {self.image_seq_length}")
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {self.max_length}")
        if self.truncate and self.max_length is None:
            raise ValueError("truncate needs max_length")


@dataclass(frozen=True)
class RenderedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    images: list[str]
    truncated: bool = False


class TemplateRefused(ValueError):
    """A chat template refused the messages (its `raise_exception(...)`, e.g. "roles must alternate")."""


def _refuse(message: str):
    raise TemplateRefused(f"the chat template refused the messages: {message}")


@lru_cache(maxsize=32)
def _compiled(source: str):
    # Jinja2 is what transformers itself uses for chat templates; same sandbox, same semantics, and the same
    # `raise_exception` that tokenizers' templates call to reject a conversation.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _refuse
    return env.from_string(source)


def render_text(template: ChatTemplate, tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The prompt string for `messages` (what `apply_chat_template(tokenize=False)` returns)."""
    source = template.jinja(getattr(tokenizer, "chat_template", None))
    return _compiled(source).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        add_bos_token=template.bos == "tokenizer" and adds_bos(tokenizer),
    )


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> adds_bos (asked per render)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first by itself (Llama's and Vicuna's do, SmolLM2's does not)."""
    if tokenizer not in _ADDS_BOS:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"] if tokenizer.bos_token_id is not None else []
        _ADDS_BOS[tokenizer] = bool(ids) and ids[0] == tokenizer.bos_token_id
    return _ADDS_BOS[tokenizer]


def prepare_messages(conv: Conversation, template: ChatTemplate, image_seq_length: int) -> list[dict]:
    """Expand `<image>` markers to image tokens (and drop user text for 'plain')."""
    out = []
    for m in conv.messages:
        content = m["content"]
        if m["role"] == "user" and template.user_images_only:
            content = IMAGE_TOKEN * content.count(IMAGE_TOKEN)
        if m["role"] == "user":
            content = content.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_seq_length)
        out.append({"role": m["role"], "content": content})
    return out


def assistant_spans(conv_id: str, template: ChatTemplate, tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the [start, end) character spans of every assistant turn."""
    full = render_text(template, tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_text(template, tokenizer, messages[:i], add_generation_prompt=True)
        through = render_text(template, tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise RecordError(conv_id, f"template {template.name!r} does not render turn {i} as a prefix extension")
        if m["content"] not in through[len(before):]:
            raise RecordError(conv_id, f"template {template.name!r}: turn {i} text not found in its rendered span")
        spans.append((len(before), len(through)))
    return full, spans


def _labels(conv_id: str, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], tokenizer) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    covered = [0] * len(spans)
    for t, (start, end) in enumerate(offsets):
        for s, (a, b) in enumerate(spans):
            if start >= a and end <= b and end > start:
                labels[t] = ids[t]
                covered[s] += 1
                break
            if start < b and end > a:
                piece = tokenizer.convert_ids_to_tokens(ids[t])
                raise RecordError(conv_id, f"token {piece!r} at chars {start}-{end} straddles assistant span {a}-{b}")
    for s, n in enumerate(covered):
        if n == 0:
            raise RecordError(conv_id, f"assistant turn {s} produced no trained tokens")
    return labels


def _truncate(conv: Conversation, ids: list[int], labels: list[int], opts: RenderOptions, image_id: int):
    keep = opts.max_length
    last_image = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
    if last_image >= keep:
        raise RecordError(conv.id, f"{len(ids)} tokens > max_length {keep}, and truncation would cut image tokens")
    if all(label == IGNORE_INDEX for label in labels[:keep]):
        raise RecordError(conv.id, f"{len(ids)} tokens > max_length {keep}; truncation would leave nothing to train")
    return ids[:keep], labels[:keep]


def render_conversation(conv: Conversation, tokenizer, template: ChatTemplate, opts: RenderOptions) -> RenderedSample:
    """Tokens and labels of a validated conversation."""
    answers = sum(m["role"] == "assistant" for m in conv.messages)
    if template.user_images_only and answers != 1:  # its user text is dropped: further turns would be unasked answers
        raise RecordError(conv.id, f"template {template.name!r} (stage 1) trains one caption per record, as LLaVA's "
                                   f"preprocess_plain; this record has {answers} assistant turns")
    messages = prepare_messages(conv, template, opts.image_seq_length)
    try:
        full, spans = assistant_spans(conv.id, template, tokenizer, messages)
    except TemplateRefused as exc:  # the template rejects this conversation: a bad record, named
        raise RecordError(conv.id, str(exc)) from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    labels = _labels(conv.id, ids, offsets, spans, tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_image = sum(1 for t in ids if t == image_id)
    expected = len(conv.images) * opts.image_seq_length
    if n_image != expected:
        raise RecordError(conv.id, f"{n_image} image tokens after tokenization, expected {expected} ({len(conv.images)} image(s))")
    truncated = False
    if opts.max_length is not None and len(ids) > opts.max_length:
        if not opts.truncate:
            raise RecordError(conv.id, f"{len(ids)} tokens > max_length {opts.max_length} (set truncation to cut)")
        ids, labels = _truncate(conv, ids, labels, opts, image_id)
        truncated = True
    return RenderedSample(conv.id, ids, labels, conv.images, truncated)


def render_record(record: dict, tokenizer, template: ChatTemplate, opts: RenderOptions) -> RenderedSample:
    """Validate a LLaVA JSON record and render it to `(input_ids, labels)`."""
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("llavakit needs a fast (Rust) tokenizer for offset mapping")
    return render_conversation(parse_record(record), tokenizer, template, opts)
