"""Chat templates as data.

A template is a `ChatTemplate` record, loaded from `templates.json` (or from a checkpoint's
config, which stores the whole record so a checkpoint never depends on this file). Every
template becomes one Jinja chat template: the same string drives training (`render.py`),
inference, and Hugging Face's `processor.apply_chat_template`, so all three agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation format.

    Format strings use `{content}`, `{system}` and `{eos_token}` placeholders.
    """

    name: str
    """Registry key, recorded in every checkpoint."""
    description: str = ""
    system: str = ""
    """Default system message ('' for none)."""
    system_format: str = ""
    """How the system message is written, e.g. '{system} '."""
    user_format: str = "{content}"
    assistant_prefix: str = ""
    """What opens an assistant turn; it is also the generation prompt. Never trained."""
    assistant_format: str = "{content}"
    """The assistant turn after its prefix, end-of-turn included. Trained in full."""
    bos: bool | str = False
    """Start the conversation with the tokenizer's BOS token: always (true), never (false), or "tokenizer": when
    the tokenizer adds one by itself (LLaVA's `plain` tokenizes with it: `<s><image>caption` for Llama)."""
    user_images_only: bool = False
    """Keep only the `<image>` markers of user turns (LLaVA's 'plain' stage-1 format). Such a template trains
    one (images, caption) pair per record, as LLaVA's `preprocess_plain`: a record of several turns is refused."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; '{eos_token}' is replaced by the tokenizer's EOS."""
    special_tokens: tuple[str, ...] = ()
    """Tokens this template needs in the vocabulary (added at `llavakit init`)."""
    use_tokenizer_template: bool = False
    """Use the tokenizer's own `chat_template` instead of the fields above."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a chat template needs a name")
        if not self.use_tokenizer_template:
            for fname in ("user_format", "assistant_format"):
                if "{content}" not in getattr(self, fname):
                    raise ValueError(f"template {self.name!r}: {fname} must contain '{{content}}'")
        if self.bos not in (True, False, "tokenizer"):
            raise ValueError(f"template {self.name!r}: bos must be true, false or \"tokenizer\", got {self.bos!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ChatTemplate":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"template {data.get('name')!r}: unknown fields {sorted(unknown)}")
        return cls(**data)

    def stop_strings(self, eos_token: str | None) -> list[str]:
        return [s.replace("{eos_token}", eos_token or "") for s in self.stop if s.replace("{eos_token}", eos_token or "")]

    def jinja(self, tokenizer_template: str | None = None) -> str:
        """The Jinja chat template for this format (for `tokenizer`: the tokenizer's own, behind PARTS_TO_TEXT)."""
        if self.use_tokenizer_template:
            if not tokenizer_template:
                raise ValueError(f"template {self.name!r} needs a tokenizer with a chat_template; this one has none")
            return tokenizer_template if tokenizer_template.startswith(PARTS_TO_TEXT) else PARTS_TO_TEXT + tokenizer_template
        return _build_jinja(self)


PARTS_TO_TEXT = (
    "{#- llavakit: list content (HF processors' parts) becomes text, an image '<image>\\n' -#}"
    "{%- set ns = namespace(messages=[]) -%}{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.messages = ns.messages + [m] -%}"
    "{%- else -%}{%- set text = namespace(value='') -%}{%- for part in m['content'] -%}"
    f"{{%- if part['type'] == 'image' -%}}{{%- set text.value = text.value + {json.dumps(IMAGE_TOKEN + chr(10))} -%}}"
    "{%- elif part['type'] == 'text' -%}{%- set text.value = text.value + part['text'] -%}{%- endif -%}{%- endfor -%}"
    "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': text.value}] -%}{%- endif -%}"
    "{%- endfor -%}{%- set messages = ns.messages -%}"
)
"""Put before a tokenizer's own chat template (written for string content, as SmolLM2's is): a processor's
`apply_chat_template` passes content as a list of parts. String content (llavakit's) passes through as it is."""


def _lit(text: str) -> str:
    """A Jinja string literal (JSON escaping is valid Jinja)."""
    return json.dumps(text)


def _split(fmt: str, key: str) -> tuple[str, str]:
    before, _, after = fmt.partition("{" + key + "}")
    return before, after


def _eos(text: str) -> str:
    """Jinja expression for a literal that may contain '{eos_token}'."""
    parts = text.split("{eos_token}")
    return " + eos_token + ".join(_lit(p) for p in parts)


def _bos_jinja(bos: bool | str) -> str:
    """`bos: "tokenizer"` reads `add_bos_token`, which llavakit's render passes; a processor does not, and its
    tokenizer then adds the BOS itself when it tokenizes the text."""
    if bos == "tokenizer":
        return "{%- if add_bos_token is defined and add_bos_token -%}{{- bos_token -}}{%- endif -%}"
    return "{{- bos_token -}}" if bos else ""


def _build_jinja(t: ChatTemplate) -> str:
    sys_before, sys_after = _split(t.system_format, "system")
    user_before, user_after = _split(t.user_format, "content")
    asst_before, asst_after = _split(t.assistant_format, "content")
    # Content may be a string (LLaVA records) or a list of parts (HF processors): PARTS_TO_TEXT makes
    # every message a string first, an image '<image>\n' in order, as in LLaVA's '<image>\nQuestion'.
    return (
        PARTS_TO_TEXT
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {_lit(t.system)} -%}}{{%- set loop_messages = messages -%}}{{%- endif -%}}"
        + _bos_jinja(t.bos)
        + (f"{{%- if system -%}}{{{{- {_eos(sys_before)} + system + {_eos(sys_after)} -}}}}{{%- endif -%}}" if t.system_format else "")
        + "{%- for message in loop_messages -%}{%- set content = message['content'] -%}"
        + (f"{{%- if message['role'] == 'user' -%}}{{%- set content = {_lit(IMAGE_TOKEN)} * content.count({_lit(IMAGE_TOKEN)}) -%}}{{%- endif -%}}"
           if t.user_images_only else "")  # `plain`: the user turn is its images alone, as training renders it
        + f"{{%- if message['role'] == 'user' -%}}{{{{- {_eos(user_before)} + content + {_eos(user_after)} -}}}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{- {_eos(t.assistant_prefix)} + {_eos(asst_before)} + content + {_eos(asst_after)} -}}}}"
        "{%- endif -%}{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- {_eos(t.assistant_prefix)} -}}}}{{%- endif -%}}"
    )


def _load_registry() -> dict[str, dict]:
    text = resources.files("llavakit.data").joinpath("templates.json").read_text(encoding="utf-8")
    return json.loads(text)


def template_names() -> list[str]:
    return sorted(_load_registry())


def get_template(name: str) -> ChatTemplate:
    """The registered template `name` (exact key; aliases resolve to their target)."""
    registry = _load_registry()
    if name not in registry:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(sorted(registry))}")
    entry = dict(registry[name])
    target = entry.pop("alias_of", None)
    if target is not None:
        resolved = get_template(target)
        return ChatTemplate.from_dict({**resolved.to_dict(), "name": name, "description": entry.get("description", "")})
    return ChatTemplate.from_dict({"name": name, **entry})


__all__ = ["ChatTemplate", "IMAGE_TOKEN", "get_template", "template_names"]
