"""A multi-turn chat that keeps its KV cache: turn N feeds only what is new since turn N-1.

Each turn renders the whole conversation with the template (the one render path) and compares
its token ids with the ids whose keys/values are in the cache. The cache is kept up to the
longest common prefix (backed off to the start of an image whose tokens or pixels differ) and
only the rest is prefilled, with `pixel_values` for just the images in that rest. When the
prefix matches, as it does turn after turn, only the new user message and the assistant
prefix are computed; when it does not (an edited history, an answer that re-tokenizes
differently, a replaced image) the differing tail is recomputed. Nothing is ever reused
without its token ids and images matching.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from llavakit.data.templates import IMAGE_TOKEN
from llavakit.infer.engine import Row
from llavakit.infer.params import SamplingParams
from llavakit.infer.prompt import build_prompt, image_starts


@dataclass
class TurnStats:
    """What the last turn computed."""

    prompt_tokens: int = 0
    reused_tokens: int = 0
    """Prompt tokens whose keys/values came from the cache."""
    prefilled_tokens: int = 0
    prefilled_images: int = 0
    generated_tokens: int = 0
    finish_reason: str | None = None


class ChatSession:
    """A conversation with one model. `messages` and `images` may be edited between turns."""

    def __init__(self, pipeline, system: str | None = None, reuse_kv: bool = True):
        self.pipeline = pipeline
        self.system = system
        self.reuse_kv = reuse_kv
        self.stats = TurnStats()
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, the pending images and the cache."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []
        self.pending: list = []
        self._cache = None
        self._cached_ids: list[int] = []
        self._cached_images: list = []

    def add_image(self, image) -> None:
        """Attach an image (a PIL image, or a file path: loaded at once) to the next user message.

        A bad image raises here (`ImageError` naming the file, TypeError for anything else) and is not attached."""
        from pathlib import Path

        from PIL import Image

        from llavakit.data.images import load_image

        if isinstance(image, (str, Path)):
            image = load_image(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"add_image takes a PIL image or a file path, not a {type(image).__name__}")
        self.pending.append(image)

    def ask(self, text: str, params: SamplingParams | None = None) -> str:
        """One turn, returning the whole answer."""
        return "".join(self.send(text, params))

    def send(self, text: str, params: SamplingParams | None = None) -> Iterator[str]:
        """One turn: add the user message (with pending images) and stream the answer's pieces.

        The answer is recorded in `messages` when the stream ends (also when it is closed early:
        then the partial answer is recorded).
        """
        if IMAGE_TOKEN in text:
            raise ValueError(f"the message contains the reserved marker {IMAGE_TOKEN}; attach images with add_image()")
        content = f"{IMAGE_TOKEN}\n" * len(self.pending) + text
        messages = [*self.messages, {"role": "user", "content": content}]
        images = [*self.images, *self.pending]
        prompt = build_prompt(self.pipeline.lm, messages, images, self.pipeline.max_positions)  # raises here, eagerly
        row = self._start(prompt, params or SamplingParams())  # so do bad pixels; the conversation is not touched yet
        return self._turn(prompt, messages, row)

    def _turn(self, prompt, messages: list[dict], row: Row) -> Iterator[str]:
        self.messages, self.images, self.pending = messages, list(prompt.images), []  # the turn starts
        try:
            for events in self.pipeline.engine.run([row], cache=self._cache, past_len=self.stats.reused_tokens):
                if events[0].text:
                    yield events[0].text
        except GeneratorExit:  # closed between steps: the cache is intact
            self._end_turn(prompt, row, keep_cache=True)
            raise
        except BaseException:  # e.g. Ctrl-C inside a forward: the cache may be half-updated
            self._end_turn(prompt, row, keep_cache=False)
            raise
        self._end_turn(prompt, row, keep_cache=True)

    def _start(self, prompt, params: SamplingParams) -> Row:
        """Crop the cache to the reusable prefix; the row feeds the rest with its images."""
        start = self._reusable_prefix(prompt.ids, prompt.images) if self.reuse_kv and self._cache is not None else 0
        if start == 0:
            self._cache = self.pipeline.engine.new_cache()
        elif start < self._cache_len():
            self._cache.crop(start - self._cache_len())
        seq_len = self.pipeline.lm.image_seq_length
        first_new = len(image_starts(prompt.ids[:start], self.pipeline.image_token_id, seq_len))
        new_images = prompt.images[first_new:]
        self.stats = TurnStats(len(prompt.ids), start, len(prompt.ids) - start, len(new_images))
        self._cached_ids, self._cached_images = [], []  # invalid until the turn ends
        return Row(prompt.ids[start:], self.pipeline.pixel_values(new_images), params, self.pipeline.text_stream(params))

    def _end_turn(self, prompt, row: Row, keep_cache: bool) -> None:
        """Record the (possibly partial) answer; keep the cache if it holds prompt + fed tokens."""
        if not row.stream.stopped:
            row.stream.finish()
        self.messages.append({"role": "assistant", "content": row.stream.text})
        self.stats.generated_tokens = len(row.generated)
        self.stats.finish_reason = row.finish or "cancelled"
        fed = self._cache_len() - len(prompt.ids)  # generated tokens whose keys/values are cached
        if keep_cache and self.reuse_kv and 0 <= fed <= len(row.generated):
            self._cached_ids = prompt.ids + row.generated[:fed]
            self._cached_images = list(prompt.images)
        else:
            self._cache, self._cached_ids, self._cached_images = None, [], []

    def _cache_len(self) -> int:
        return self._cache.get_seq_length() if self._cache is not None else 0

    def _reusable_prefix(self, ids: list[int], images: list) -> int:
        """Cached tokens that can stay: common token prefix, cut before the first changed image, < len(ids)."""
        cached = self._cached_ids
        n = 0
        limit = min(len(cached), len(ids) - 1)  # at least one token is fed, to get logits
        while n < limit and cached[n] == ids[n]:
            n += 1
        seq_len = self.pipeline.lm.image_seq_length
        starts = image_starts(ids, self.pipeline.image_token_id, seq_len)
        for k, start in enumerate(starts):
            if start >= n:
                break
            same = k < len(self._cached_images) and self._cached_images[k] is images[k]
            if not same or start + seq_len > n:  # a different image, or the prefix ends inside this image
                return start
        return n
