"""The decode loop: each row is prefilled on its own, then all live rows decode together.

Prefill is compute-bound on a CPU, so a row gains nothing from sharing it, and alone it wastes no
work on padding (and, under int8, no padding or neighbour skews its activation scales). Decode is
memory-bound: one step reads every weight once whatever the batch, so rows decode as one batch
over a shared, left-padded KV cache. New rows can join a running batch between steps (the server
uses this: continuous batching) and finished rows leave it.

Why not `model.generate`: the chat session keeps one `DynamicCache` across turns and feeds only
the uncached suffix of the conversation, with `pixel_values` for just the images in that suffix;
the server needs per-row sampling parameters and stop strings, rows joining and leaving, and
streaming of every row. `generate` offers none of these together, and at small sizes its per-step
Python overhead is a large share of decode time. This loop calls the model's own forward (the
same `LlavaForConditionalGeneration.forward` training uses), so the math is unchanged: tests
check its greedy tokens against `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from llavakit.infer.params import SamplingParams
from llavakit.infer.text import TextStream


@dataclass
class Row:
    """One sequence to continue."""

    ids: list[int]
    """Tokens to feed: the whole prompt, or the uncached suffix when a cache is passed to `run`."""
    pixel_values: torch.Tensor | None
    """[N, 3, H, W] for the N images whose tokens are in `ids`, in order."""
    params: SamplingParams
    stream: TextStream
    cancelled: Callable[[], bool] | None = None
    generated: list[int] = field(default_factory=list)
    finish: str | None = None
    """'stop' (EOS / stop string), 'length' (max_new_tokens or context), 'cancelled'."""


@dataclass(frozen=True)
class Event:
    """What one row produced in one step."""

    row: int
    """Index into the `rows` passed to `run`."""
    token: int
    text: str
    """Newly final text ('' while held back)."""
    finish: str | None


class Engine:
    """Runs rows on a `LlavaForConditionalGeneration`. One `run` at a time (not thread-safe)."""

    def __init__(self, model, pad_token_id: int, max_positions: int):
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_positions = max_positions
        self.suppress = [int(model.config.image_token_id)]
        """Never sampled: an `<image>` token in an answer has no image behind it."""

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.text_config)

    @torch.inference_mode()
    def forward(self, ids, pixel_values, mask, positions, cache) -> torch.Tensor:
        """Logits of the last position of every row. ids, positions: [B, T]; mask: [B, past+T] or None."""
        out = self.model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()  # [B, V]

    def run(self, rows: list[Row], cache=None, past_len: int = 0,
            admit: Callable[[], list[Row]] | None = None) -> Iterator[list[Event]]:
        """Yield, per step, one `Event` per live row; the last event of a row has `finish` set.

        With `cache` (holding `past_len` tokens) there must be exactly one row: its `ids` continue
        the cache, in place. `admit`, called between steps, returns rows that join the batch; their
        events carry indices after the initial rows, in the order admitted.
        """
        if cache is not None and len(rows) != 1:
            raise ValueError("continuing a cache needs exactly one row")
        rows, batch = list(rows), DecodeBatch()
        generators = []
        for i, row in enumerate(rows):
            self._join(batch, i, row, cache, past_len)
            generators.append(_generator(row.params))
        while batch.live:
            live = batch.live
            blocked = [early_stop_ids(rows[i], batch.logits.shape[1]) for i in live]
            tokens = sample(batch.logits, [rows[i].params for i in live], [generators[i] for i in live],
                            self.suppress, blocked)  # [b]
            events, keep = self._advance(rows, live, tokens, batch.next_pos)
            yield events
            tokens = batch.keep(keep, tokens)  # [b'] tokens of the rows that go on
            if batch.live:
                batch.logits = self.forward(tokens[:, None], None, batch.step_mask(), batch.next_pos[:, None],
                                            batch.cache)  # [b', V]
                batch.next_pos = batch.next_pos + 1
            for row in admit() if admit is not None else ():
                rows.append(row)
                generators.append(_generator(row.params))
                self._join(batch, len(rows) - 1, row, None, 0)

    def _join(self, batch: "DecodeBatch", index: int, row: Row, cache, past_len: int) -> None:
        """Prefill `row` alone (continuing `cache` if given) and add it to the batch."""
        if not row.ids:
            raise ValueError("a row needs at least one token to feed")
        cache = cache if cache is not None else self.new_cache()
        ids = torch.tensor([row.ids], dtype=torch.long)  # [1, T]
        positions = torch.arange(past_len, past_len + len(row.ids))[None]  # [1, T]
        logits = self.forward(ids, row.pixel_values, None, positions, cache)  # [1, V]
        batch.add(index, cache, past_len + len(row.ids), logits)

    def _advance(self, rows, live, tokens, next_pos) -> tuple[list[Event], list[int]]:
        """Push each live row's new token; return the events and which batch slots go on."""
        events, keep = [], []
        for j, i in enumerate(live):
            row, token = rows[i], int(tokens[j])
            row.generated.append(token)
            text = row.stream.push(token)
            row.finish = self._finish_reason(row, int(next_pos[j]))
            if row.finish is not None:
                text += row.stream.finish()
            else:
                keep.append(j)
            events.append(Event(i, token, text, row.finish))
        return events, keep

    def _finish_reason(self, row: Row, position: int) -> str | None:
        if row.stream.stopped:
            return "stop"
        if len(row.generated) >= row.params.max_new_tokens or position >= self.max_positions:
            return "length"
        if row.cancelled is not None and row.cancelled():
            return "cancelled"
        return None


class DecodeBatch:
    """Rows decoding together: one KV cache, left-padded to a common length, and its mask."""

    def __init__(self):
        self.live: list[int] = []
        """Row indices, in batch order."""
        self.cache = None
        self.mask: torch.Tensor | None = None  # [b, L] 1 = real token, 0 = left padding
        self.next_pos = torch.zeros(0, dtype=torch.long)  # [b] position of each row's next token
        self.logits: torch.Tensor | None = None  # [b, V] for each row's next token

    def add(self, index: int, cache, length: int, logits: torch.Tensor) -> None:
        """Append a prefilled row (its own cache of `length` tokens, logits [1, V])."""
        row_mask = torch.ones(1, length, dtype=torch.long)  # [1, length]
        if not self.live:
            self.cache, self.mask, self.logits, self.next_pos = cache, row_mask, logits, torch.tensor([length])
        else:
            self.cache, self.mask = merge_left_padded(self.cache, self.mask, cache, row_mask)
            self.logits = torch.cat([self.logits, logits])  # [b+1, V]
            self.next_pos = torch.cat([self.next_pos, torch.tensor([length])])  # [b+1]
        self.live.append(index)

    def keep(self, slots: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """Drop every row not in `slots` (batch positions); return the kept rows' tokens."""
        if len(slots) == len(self.live):
            return tokens
        if slots:
            idx = torch.tensor(slots)
            self.cache.batch_select_indices(idx)
            self.mask, self.next_pos, tokens = self.mask[idx], self.next_pos[idx], tokens[idx]
            self.mask = self.mask[:, int((self.mask.sum(0) == 0).sum()):]  # drop columns padding every row
            _crop_left(self.cache, self.mask.shape[1])
        self.live = [self.live[j] for j in slots]
        return tokens

    def step_mask(self) -> torch.Tensor | None:
        """Grow the mask by the token about to be fed; None when nothing is padded (the fast path)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.live), 1)], dim=1)  # [b, L+1]
        return None if bool(self.mask.all()) else self.mask


def _left_pad_kv(t: torch.Tensor, n: int) -> torch.Tensor:  # t: [b, heads, L, d] -> [b, heads, n+L, d]
    return t if n == 0 else torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def merge_left_padded(a, a_mask: torch.Tensor, b, b_mask: torch.Tensor):
    """One cache holding the rows of `a` then those of `b`, left-padded to a common length, and its mask."""
    la, lb = a_mask.shape[1], b_mask.shape[1]
    length = max(la, lb)
    for cache in (a, b):
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise NotImplementedError("batching needs full-attention KV caches (this LM has sliding-window layers)")
    for la_, lb_ in zip(a.layers, b.layers):
        la_.keys = torch.cat([_left_pad_kv(la_.keys, length - la), _left_pad_kv(lb_.keys, length - lb)])
        la_.values = torch.cat([_left_pad_kv(la_.values, length - la), _left_pad_kv(lb_.values, length - lb)])
    mask = torch.cat([torch.nn.functional.pad(a_mask, (length - la, 0)),
                      torch.nn.functional.pad(b_mask, (length - lb, 0))])  # [b_a + b_b, length]
    return a, mask


def _crop_left(cache, length: int) -> None:
    """Keep the last `length` positions of every layer (after dropping all-padding columns)."""
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.shape[2] > length:
            layer.keys = layer.keys[:, :, -length:]
            layer.values = layer.values[:, :, -length:]


def early_stop_ids(row: Row, vocab_size: int) -> list[int]:
    """Stop tokens this row may not sample yet (it is short of `min_new_tokens`)."""
    if len(row.generated) >= row.params.min_new_tokens:
        return []
    return [t for t in row.stream.rule.token_ids if t < vocab_size]


def left_pad(seqs: list[list[int]], pad_id: int):
    """ids [B, T] padded on the left, mask [B, T] (None when nothing is padded), positions [B, T].

    For batched prefill outside the engine (e.g. feeding `generate` the same prompts)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, T]
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[b, width - len(s):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
    return ids, (None if bool(mask.all()) else mask), positions


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy or params.seed is None:
        return None
    return torch.Generator().manual_seed(int(params.seed))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list, suppress: list[int],
           blocked: list[list[int]] | None = None) -> torch.Tensor:
    """One token per row: argmax for greedy rows, temperature/top-k/top-p sampling for the rest.

    `suppress` ids are never sampled; `blocked[j]` ids are not sampled for row j.
    """
    logits = logits.clone()  # [b, V]
    logits[:, suppress] = float("-inf")
    for j, ids in enumerate(blocked or []):
        if ids:
            logits[j, ids] = float("-inf")
    tokens = logits.argmax(dim=-1)  # [b]
    for j, p in enumerate(params):
        if not p.greedy:
            tokens[j] = _sample_row(logits[j], p, generators[j])
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, generator) -> torch.Tensor:
    logits = logits / p.temperature  # [V]
    if 0 < p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [V]
    if p.top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)[0]
    sorted_p, order = probs.sort(descending=True)  # [V], [V]
    outside = sorted_p.cumsum(0) - sorted_p > p.top_p  # smallest prefix with mass >= top_p stays
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return order[torch.multinomial(sorted_p, 1, generator=generator)[0]]
