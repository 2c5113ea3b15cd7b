"""Chat messages + images -> prompt token ids, through the same render path as training.

`<image>` markers in user messages are expanded with `prepare_messages` and the conversation is
rendered with `render_text` (the template's one Jinja string), so inference sees exactly the token
layout the model was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llavakit.data.records import Conversation
from llavakit.data.render import TemplateRefused, prepare_messages, render_text
from llavakit.data.templates import IMAGE_TOKEN

ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A conversation that cannot be turned into a prompt; the message names the culprit."""


@dataclass
class Prompt:
    """Token ids of a rendered conversation and its images, in marker order."""

    ids: list[int]
    images: list = field(default_factory=list)
    """PIL images, one per `<image>` marker."""

    def __len__(self) -> int:
        return len(self.ids)


def user_message(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def check_messages(messages: list[dict], n_images: int) -> None:
    """Roles, content types, marker placement and the marker/image count."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("a conversation needs at least one message")
    markers = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise PromptError(f"message {i} must be {{'role': system|user|assistant, 'content': str}}, got {m!r:.120}")
        if m["role"] == "system" and i != 0:
            raise PromptError(f"message {i}: a system message may only come first")
        if m["role"] != "user" and IMAGE_TOKEN in m["content"]:
            raise PromptError(f"message {i} ({m['role']}): {IMAGE_TOKEN} may only appear in user messages")
        markers += m["content"].count(IMAGE_TOKEN)
    if markers != n_images:
        raise PromptError(f"the conversation has {markers} {IMAGE_TOKEN} marker(s) but {n_images} image(s) were given")
    last = messages[-1]["role"]
    if last != "user":
        raise PromptError(f"the last message must be from the user (to be answered), got {last!r}")


def render_ids(lm, messages: list[dict], n_images: int, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` (markers expanded), rendered with the model's template."""
    from jinja2 import TemplateError

    conv = Conversation(id="", messages=messages, images=[""] * n_images)
    expanded = prepare_messages(conv, lm.template, lm.image_seq_length)
    try:
        text = render_text(lm.template, lm.tokenizer, expanded, add_generation_prompt)
    except TemplateRefused as exc:
        raise PromptError(str(exc)) from None
    except TemplateError as exc:  # a template that fails on these messages (e.g. an undefined field)
        raise PromptError(f"the chat template failed on the messages: {type(exc).__name__}: {exc}") from None
    return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(lm, messages: list[dict], images: list, max_positions: int) -> Prompt:
    """Validate and render a conversation that ends with a user message; raise `PromptError` naming the problem."""
    check_messages(messages, len(images))
    ids = render_ids(lm, messages, len(images))
    image_id = lm.model.config.image_token_id
    found = sum(1 for t in ids if t == image_id)
    if found != len(images) * lm.image_seq_length:
        raise PromptError(
            f"{found} image tokens after tokenization, expected {len(images) * lm.image_seq_length} "
            f"({len(images)} image(s) x {lm.image_seq_length}); does the text contain the reserved token {IMAGE_TOKEN!r}?"
        )
    if len(ids) >= max_positions:
        raise PromptError(
            f"the prompt is {len(ids)} tokens ({found} of them image tokens) but the model's context is "
            f"{max_positions} positions; shorten the conversation or use fewer images"
        )
    return Prompt(ids, list(images))


def image_starts(ids: list[int], image_id: int, seq_len: int) -> list[int]:
    """Index of the first token of every image: each image is `seq_len` consecutive image tokens."""
    positions = [i for i, t in enumerate(ids) if t == image_id]
    return positions[::seq_len]
