"""The Python inference API.

    from llavakit.infer.api import load_pipeline
    pipe = load_pipeline("runs/instruct/model")            # a model dir (or a short name, see MODEL_REGISTRY)
    pipe.generate([([image], "<image>\\nWhat is this?")])   # -> ["A red circle."]
    for piece in pipe.stream([image], "<image>\\nDescribe it."): print(piece, end="")
    chat = pipe.session(); chat.add_image(image); chat.ask("What is it?"); chat.ask("And its colour?")

User text carries one `<image>` marker per image, in order; the pipeline applies the model's chat
template through the training render path. Greedy decoding (temperature 0) is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llavakit import default_model
from llavakit.infer.params import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from llavakit.infer.prompt import Prompt, PromptError, build_prompt, user_message

MODEL_REGISTRY: dict[str, Callable[[], str | Path] | str | Path] = {"default": default_model.path}
"""Short model names (exact keys) -> a model dir, or a function that returns one (building it on first
use). `default` is llavakit's shipped default model (llavakit/default_model: materialised from the shipped
parts + the smollm2-135m base on first use). `load_pipeline` looks names up here before treating the
argument as a path."""


def resolve_model(model: str | Path) -> Path:
    """The model dir for a short name or a path; `FileNotFoundError` naming what is wrong."""
    name = str(model)
    if name in MODEL_REGISTRY:
        target = MODEL_REGISTRY[name]
        path = Path(target() if callable(target) else target)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"short name {name!r} points to {path}, which has no config.json")
        return path
    path = Path(name)
    if (path / "config.json").is_file():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is not a model dir (config.json missing)")
    known = ", ".join(sorted(MODEL_REGISTRY)) or "none registered"
    raise FileNotFoundError(f"model {name!r} not found: no such dir, and not a short name (known: {known})")


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    text: str
    finish_reason: str
    """'stop', 'length' or 'cancelled'."""
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]


Conversation = str | list[dict]
"""A user text with `<image>` markers, or chat messages [{'role', 'content'}] ending with a user message."""


def load_pipeline(model: str | Path, *, int8: bool = False, fast: bool = True, max_batch_size: int = 8,
                  threads: int | None = None, model_id: str | None = None, template: str | None = None,
                  **options) -> "Pipeline":
    """Load a model dir (or registered short name) for inference.

    int8: dynamic int8 quantization of the LM's linears. fast: fused (q/k/v, gate/up) fp32 linears
    laid out for decode (`pack_linears`; ignored with int8). threads: torch intra-op threads
    (default: torch's choice). template: prompt with this registered chat template instead of the
    model's own (`hfdirs.load_with_template`; the dir is not changed). options: passed to `Pipeline`.
    """
    import torch

    from llavakit.model.hfdirs import load_with_template, named_template

    if template is not None:
        named_template(template)  # an unknown name fails before the (default) model is resolved or built
    if threads:
        torch.set_num_threads(threads)
    path = resolve_model(model)
    lm = load_with_template(path, template)
    return Pipeline(lm, int8=int8, fast=fast, max_batch_size=max_batch_size, model_id=model_id or path.name, **options)


class Pipeline:
    """A loaded model plus everything to prompt it, decode, and stream.

    It changes `lm.model` in place for inference (packed or int8 linears): give it its own copy.
    One generation at a time: the engine is not thread-safe (the server runs it on one thread).
    """

    def __init__(self, lm, *, int8: bool = False, fast: bool = True, max_batch_size: int = 8,
                 model_id: str = "llavakit"):
        from llavakit.infer.engine import Engine
        from llavakit.infer.optimize import pack_linears, quantize_int8

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.lm = lm
        self.model_id = model_id
        self.max_batch_size = max_batch_size
        self.int8 = int8
        self.max_positions = int(lm.model.config.text_config.max_position_embeddings)
        self.image_token_id = int(lm.model.config.image_token_id)
        if int8:
            quantize_int8(lm.model)
        elif fast:
            pack_linears(lm.model)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
        self.engine = Engine(lm.model, int(pad), self.max_positions)
        self._eos_ids = _eos_ids(lm)

    # -- building blocks -------------------------------------------------------------------

    def prompt(self, images: Sequence, conversation: Conversation) -> Prompt:
        """Validated prompt ids for a conversation; `PromptError` names the problem."""
        messages = user_message(conversation) if isinstance(conversation, str) else list(conversation)
        _check_images(images)
        return build_prompt(self.lm, messages, list(images), self.max_positions)

    def pixel_values(self, images: Sequence):
        """[N, 3, H, W] pixel values for PIL images of any mode (None for no images).

        Every image goes through `to_rgb` first, as files do in `load_images`, so a PIL image and
        the same file give the same pixels (the processor's own conversion clips 16-bit to white).
        """
        if not images:
            return None
        from llavakit.data.images import to_rgb

        _check_images(images)
        rgb = [to_rgb(im, f"image {i}") for i, im in enumerate(images)]
        return self.lm.image_processor(rgb, return_tensors="pt")["pixel_values"]  # [N, 3, H, W]

    def text_stream(self, params: SamplingParams):
        from llavakit.infer.text import StopRule, TextStream

        stops = [*self.lm.template.stop_strings(self.lm.tokenizer.eos_token), *params.stop]
        return TextStream(self.lm.tokenizer, StopRule.build(self.lm.tokenizer, stops, self._eos_ids))

    def row(self, prompt: Prompt, params: SamplingParams, cancelled=None):
        from llavakit.infer.engine import Row

        self._check_budget(prompt, params)
        return Row(list(prompt.ids), self.pixel_values(prompt.images), params, self.text_stream(params), cancelled)

    def _check_budget(self, prompt: Prompt, params: SamplingParams) -> None:
        if len(prompt.ids) >= self.max_positions:
            raise PromptError(f"the prompt is {len(prompt.ids)} tokens; the model's context is {self.max_positions}")

    # -- batch generation ------------------------------------------------------------------

    def generate(self, batch: Sequence[tuple[Sequence, Conversation]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] = ()) -> list[str]:
        """Answers for (images, user text with `<image>` markers) pairs, in order."""
        params = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop))
        return [c.text for c in self.complete(batch, params)]

    def complete(self, batch: Sequence[tuple[Sequence, Conversation]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """`Completion`s for (images, conversation) pairs; one params for all or one per item."""
        items = list(batch)
        per_item = [params] * len(items) if isinstance(params, SamplingParams) else list(params)
        if len(per_item) != len(items):
            raise ValueError(f"{len(per_item)} sampling params for {len(items)} items")
        prompts = [self._prompt_for(i, images, conv) for i, (images, conv) in enumerate(items)]
        out: list[Completion] = []
        for lo in range(0, len(items), self.max_batch_size):
            hi = lo + self.max_batch_size
            out.extend(self.run_prompts(prompts[lo:hi], per_item[lo:hi]))
        return out

    def _prompt_for(self, index: int, images, conversation) -> Prompt:
        try:
            return self.prompt(images, conversation)
        except PromptError as exc:
            raise PromptError(f"item {index}: {exc}") from None

    def run_prompts(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[Completion]:
        """One batch (left-padded) to completion."""
        rows = [self.row(p, sp) for p, sp in zip(prompts, params)]
        for _ in self.engine.run(rows):
            pass
        return [_completion(p, r) for p, r in zip(prompts, rows)]

    # -- streaming -------------------------------------------------------------------------

    def stream(self, images: Sequence, conversation: Conversation, params: SamplingParams | None = None,
               **kwargs) -> Iterator[str]:
        """Text pieces of one answer as they are decoded; they join to the `generate` answer.

        Sampling options come as `params` or as keywords (max_new_tokens=..., temperature=...).
        """
        params = params or SamplingParams(**kwargs)
        row = self.row(self.prompt(images, conversation), params)
        return (e[0].text for e in self.engine.run([row]) if e[0].text)

    def session(self, system: str | None = None, reuse_kv: bool = True):
        """A multi-turn chat that keeps its KV cache between turns (`ChatSession`)."""
        from llavakit.infer.session import ChatSession

        return ChatSession(self, system=system, reuse_kv=reuse_kv)

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def load_images(paths: Sequence[str | Path]) -> list:
        """RGB PIL images from files; `ImageError` names the file on any failure."""
        from llavakit.data.images import load_image

        return [load_image(p) for p in paths]


def _check_images(images: Sequence) -> None:
    """Images must be PIL images (file paths go through `Pipeline.load_images`)."""
    from PIL import Image

    for i, im in enumerate(images):
        if not isinstance(im, Image.Image):
            raise PromptError(f"image {i} is a {type(im).__name__}, not a PIL image (load files with load_images)")


def _completion(prompt: Prompt, row) -> Completion:
    return Completion(row.stream.text, row.finish or "length", len(prompt.ids), len(row.generated), tuple(row.generated))


def _eos_ids(lm) -> list[int]:
    ids = [lm.tokenizer.eos_token_id]
    gen = getattr(lm.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids += extra if isinstance(extra, list) else [extra]
    return [int(i) for i in ids if i is not None]
