"""The decode loop: rows are prefilled, then all live rows decode together.

Prefill is compute-bound on a CPU, so sharing it saves only per-call overhead: a row is prefilled
alone, except that fresh short rows of similar length (`prefill_groups`, at most
`PREFILL_GROUP_TOKENS` in all) go through one right-padded forward, which wastes at most 1/8 on
padding (int8 scales are per token, so padding never skews them). Decode is memory-bound: one step
reads every weight once whatever the batch, so rows decode as one batch over a shared, left-padded
KV cache; products of several rows go through oneDNN's prepacked kernels (`prepack_multirow`),
as MKL's few-row sgemm made a step of 8 rows cost 2.4x a step of one. New rows can join a running
batch between steps (the server uses this: continuous batching) and finished rows leave it.

Why not `model.generate`: the chat session keeps one `DynamicCache` across turns and feeds only
the uncached suffix of the conversation, with `pixel_values` for just the images in that suffix;
the server needs per-row sampling parameters and stop strings, rows joining and leaving, and
streaming of every row. `generate` offers none of these together, and at small sizes its per-step
Python overhead is a large share of decode time. Prefill calls the model's own forward (the same
`LlavaForConditionalGeneration.forward` training uses); decode steps go through `DecodeStep`
(llavakit.infer.optimize), the same computation through the same modules minus transformers'
per-call plumbing, where the LM family is supported (else the model's forward). Tests check the
greedy tokens against `generate`.

The KV cache is transformers' `DynamicCache` with `SlabLayer`s: keys/values are views of a buffer
with spare room, so a decode step writes one position in place instead of copying the cache.
(transformers' `StaticCache` also writes in place, but preallocates a fixed batch and maximum
length and cannot be cropped, which chat turns and rows joining and leaving need.)

Compiling is opt-in (`Engine.compile_decode`, or `LLAVAKIT_COMPILE_DECODE=1` for every engine):
single-row steps then run as one inductor graph, which takes tens of seconds to build.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from llavakit.infer.optimize import (CompiledDecodeStep, DecodeStep, DenseLinear, compiled_step_supported,
                                     decode_step_unsupported)
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


COMPILE_ENV = "LLAVAKIT_COMPILE_DECODE"
"""Set to 1 to compile single-row decode steps in every new engine whose linears are packed (`compile_decode`)."""

ONEDNN_ENV = "LLAVAKIT_ONEDNN_ROWS"
"""Set to 0 to keep MKL for products of several rows (no prepacked weight copies: less memory, slower batches)."""


def cache_kwarg(model) -> str:
    """`cache` where the installed transformers takes it (it deprecates `past_key_values`, gone in 5.40), else
    `past_key_values` (earlier 5.x releases)."""
    import inspect

    for klass in type(model).__mro__:  # the first forward that names its arguments (subclasses may take **kwargs)
        params = inspect.signature(vars(klass)["forward"]).parameters if "forward" in vars(klass) else {}
        if "cache" in params or "past_key_values" in params:
            return "cache" if "cache" in params else "past_key_values"
    return "past_key_values"


class Engine:
    """Runs rows on a `LlavaForConditionalGeneration`. One `run` at a time (not thread-safe)."""

    def __init__(self, model, pad_token_id: int, max_positions: int):
        self.model = model
        self.pad_token_id = pad_token_id
        self.max_positions = max_positions
        self.suppress = [int(model.config.image_token_id)]
        """Never sampled: an `<image>` token in an answer has no image behind it."""
        self.decode_step = DecodeStep(model) if decode_step_unsupported(model) is None else None
        """The one-token forward used between prefills; None: the model's forward (set None to compare)."""
        self.compiled_step: CompiledDecodeStep | None = None
        """Set by `compile_decode`: single-row steps go through it."""
        self.cache_kwarg = cache_kwarg(model)
        """The forward's name for the KV cache (`past_key_values`, renamed `cache` in later transformers 5.x)."""
        self.onednn_linears = prepack_multirow(model) if os.environ.get(ONEDNN_ENV, "1") != "0" else 0
        """How many packed linears run products of several rows through oneDNN (`prepack_multirow`)."""
        if os.environ.get(COMPILE_ENV) == "1" and compiled_step_supported(model):
            self.compile_decode()

    def compile_decode(self) -> None:
        """Run single-row decode steps through one compiled graph (`CompiledDecodeStep`; needs packed linears).

        The graph compiles at the first single-row step (tens of seconds; then cached by inductor on disk)."""
        self.compiled_step = CompiledDecodeStep(self.model)

    def new_cache(self):
        """A `DynamicCache` whose full-attention layers append in place (`SlabLayer`)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config.text_config)
        cache.layers = [SlabLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        return cache

    @torch.inference_mode()
    def forward(self, ids, pixel_values, mask, positions, cache, keep: int | torch.Tensor = 1) -> torch.Tensor:
        """Logits of the last position of every row (or of position `keep[b, 0]` of row b) [B, V].

        ids, positions: [B, T]; mask: [B, past+T] or None; keep: 1, or [B, 1] positions."""
        out = self.model(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=keep, **{self.cache_kwarg: cache})
        return out.logits[:, -1].float()  # [B, V]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache) -> torch.Tensor:
        """Logits [b, V] after feeding one token per row. tokens, positions: [b, 1]; mask: [b, past+1] or None."""
        if (self.compiled_step is not None and tokens.shape[0] == 1 and mask is None
                and all(isinstance(layer, SlabLayer) for layer in cache.layers)):
            return self._compiled(tokens, positions, cache)
        if self.decode_step is None:
            return self.forward(tokens, None, mask, positions, cache)
        return self.decode_step(tokens, positions, cache, mask)

    def _compiled(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One row's step through the compiled graph, writing into the slab buffers in place."""
        layers = cache.layers
        slot = layers[0].get_seq_length()
        for layer in layers:
            layer.make_room(slot + 1)
        logits = self.compiled_step(tokens, positions, [layer.buffers[0] for layer in layers],
                                    [layer.buffers[1] for layer in layers], slot)  # [1, V]
        for layer in layers:
            layer.extend_to(slot + 1)
        return logits

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
        generators = [_generator(row.params) for row in rows]
        if cache is not None:
            self._join(batch, 0, rows[0], cache, past_len)
        else:
            self._join_new(batch, rows, 0)
        while batch.live:
            live = batch.live
            blocked = [early_stop_ids(rows[i], batch.logits.shape[1]) for i in live]
            tokens = sample(batch.logits, [rows[i].params for i in live], [generators[i] for i in live],
                            self.suppress, blocked)  # [b]
            events, keep = self._advance(rows, live, tokens, batch.next_pos)
            yield events
            tokens = batch.keep(keep, tokens)  # [b'] tokens of the rows that go on
            if batch.live:
                batch.logits = self.step(tokens[:, None], batch.next_pos[:, None], batch.step_mask(),
                                         batch.cache)  # [b', V]
                batch.next_pos = batch.next_pos + 1
            new = list(admit()) if admit is not None else []
            if new:
                rows.extend(new)
                generators.extend(_generator(row.params) for row in new)
                self._join_new(batch, new, len(rows) - len(new))

    def _join_new(self, batch: "DecodeBatch", rows: list[Row], first: int) -> None:
        """Prefill fresh rows (`rows[j]` is row `first + j`), those of similar length together, and add them."""
        for group in prefill_groups([len(row.ids) for row in rows]):
            if len(group) == 1:
                self._join(batch, first + group[0], rows[group[0]], None, 0)
            else:
                self._join_group(batch, [first + j for j in group], [rows[j] for j in group])

    def _join(self, batch: "DecodeBatch", index: int, row: Row, cache, past_len: int) -> None:
        """Prefill `row` alone (continuing `cache` if given) and add it to the batch."""
        if not row.ids:
            raise ValueError("a row needs at least one token to feed")
        cache = cache if cache is not None else self.new_cache()
        ids = torch.tensor([row.ids], dtype=torch.long)  # [1, T]
        positions = torch.arange(past_len, past_len + len(row.ids))[None]  # [1, T]
        logits = self.forward(ids, row.pixel_values, None, positions, cache)  # [1, V]
        length = past_len + len(row.ids)
        batch.add([index], cache, torch.ones(1, length, dtype=torch.long), logits, torch.tensor([length]))

    def _join_group(self, batch: "DecodeBatch", indices: list[int], rows: list[Row]) -> None:
        """Prefill fresh rows as one batch and add them.

        Rows are right-padded: under causal attention a real token never sees the padding after
        it, so no mask is needed and each row gets the same positions and attention as alone (the
        matrix products may sum in another order). Each row's logits are taken at its last real
        token, and the cache is then realigned to the right, as decoding wants.
        """
        if any(not row.ids for row in rows):
            raise ValueError("a row needs at least one token to feed")
        lengths = torch.tensor([len(row.ids) for row in rows])  # [k]
        ids = right_pad([row.ids for row in rows], self.pad_token_id)  # [k, T]
        positions = torch.arange(ids.shape[1]).expand(len(rows), -1)  # [k, T]
        pixels = [row.pixel_values for row in rows if row.pixel_values is not None]
        cache = self.new_cache()
        logits = self.forward(ids, torch.cat(pixels) if pixels else None, None, positions, cache,
                              keep=lengths[:, None] - 1)  # [k, V]
        mask = align_right(cache, lengths)  # [k, T]
        batch.add(indices, cache, mask, logits, lengths)

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

    def add(self, indices: list[int], cache, mask: torch.Tensor, logits: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Append k prefilled rows: their cache (left-padded per `mask` [k, L]), logits [k, V], next positions [k]."""
        if not self.live:
            self.cache, self.mask, self.logits, self.next_pos = cache, mask, logits, next_pos
        else:
            self.cache, self.mask = merge_left_padded(self.cache, self.mask, cache, mask)
            self.logits = torch.cat([self.logits, logits])  # [b+k, V]
            self.next_pos = torch.cat([self.next_pos, next_pos])  # [b+k]
        self.live.extend(indices)

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


class SlabLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values are views of a larger buffer; appends write in place.

    `DynamicLayer` concatenates on every update, so each decode step copies the whole cache into
    fresh memory (60 tensors of ~0.5 MB per step for a 600-token prompt on SmolLM2-135M). Here the
    buffer has room for `length // 2` (at least 256) more positions, and grows by copying when full.
    Whoever replaces `keys`/`values` (crop, row selection, merging rows) is noticed: the next
    update moves them into a new buffer.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._kbuf = self._vbuf = None  # [b, heads, capacity, d]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: [b, heads, t, d] -> keys, values [b, heads, length + t, d]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        self.make_room(end, key_states)  # a new buffer if keys/values were replaced (e.g. another batch)
        self._kbuf.narrow(2, start, end - start).copy_(key_states)
        self._vbuf.narrow(2, start, end - start).copy_(value_states)
        self._set_views(end)
        return self.keys, self.values

    @property
    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers [b, heads, capacity, d]; positions past the cached length are zeros."""
        return self._kbuf, self._vbuf

    def make_room(self, end: int, like: torch.Tensor | None = None) -> None:
        """Make the buffers hold the cached positions and have room up to `end` (`like`: [b, heads, t, d])."""
        if not self._owns_views() or end > self._kbuf.shape[2]:
            self._reserve(self.get_seq_length(), end, self.keys if like is None else like)

    def extend_to(self, length: int) -> None:
        """The buffers were written up to `length` from outside (a compiled step): view that much."""
        self._set_views(length)

    def _owns_views(self) -> bool:
        return self._kbuf is not None and self.keys is self._kview and self.values is self._vview

    def _reserve(self, start: int, end: int, like: torch.Tensor) -> None:
        """A new buffer with room for `end` positions and more; the first `start` copied from the current views."""
        b, heads, _, d = like.shape
        capacity = end + max(256, end // 2)
        kbuf, vbuf = like.new_zeros(b, heads, capacity, d), like.new_zeros(b, heads, capacity, d)  # [b, heads, cap, d]
        if start:
            kbuf.narrow(2, 0, start).copy_(self.keys)
            vbuf.narrow(2, 0, start).copy_(self.values)
        self._kbuf, self._vbuf = kbuf, vbuf

    def _set_views(self, length: int) -> None:
        self.keys = self._kbuf.narrow(2, 0, length)  # [b, heads, length, d]
        self.values = self._vbuf.narrow(2, 0, length)
        self._kview, self._vview = self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        owned = self.is_initialized and self._owns_views()
        super().crop(tokens_to_remove)
        if owned:  # still a prefix of the buffer: keep appending in place
            self._set_views(self.keys.shape[2])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0 and self._owns_views():
            self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]  # [b', heads, cap, d]
            self._set_views(self.keys.shape[2])
        else:
            super().batch_select_indices(indices)


MULTIROW_HINT = 8
"""The row count oneDNN lays the prepacked weights out for (a decode step of a full server batch)."""


@torch.inference_mode()
def prepack_multirow(model) -> int:
    """Products of more than one row (prefill, batched decode steps) through oneDNN with prepacked weights.

    Every fp32 `DenseLinear` of the LM and its head (as `pack_linears` installs them) gets a
    oneDNN-prepacked copy of its weight (`DenseLinear.prepack_multirow`); single rows (batch-1
    decode, compiled steps) keep their faster path. `LLAVAKIT_ONEDNN_ROWS=0` turns it off (less
    memory, slower batches). Returns how many linears were routed (0 without oneDNN or packed
    linears); calling it again changes nothing.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in (*model.model.language_model.modules(), model.lm_head):
        if isinstance(module, DenseLinear) and module.multirow_weight is None:
            module.prepack_multirow(MULTIROW_HINT)
            count += 1
    return count


def _left_pad_kv(t: torch.Tensor, n: int) -> torch.Tensor:  # t: [b, heads, L, d] -> [b, heads, n+L, d]
    return t if n == 0 else torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def merge_left_padded(a, a_mask: torch.Tensor, b, b_mask: torch.Tensor):
    """One cache holding the rows of `a` then those of `b`, left-padded to a common length, and its mask."""
    la, lb = a_mask.shape[1], b_mask.shape[1]
    length = max(la, lb)
    for cache in (a, b):
        if any(not isinstance(layer, DynamicLayer) or layer.is_sliding for layer in cache.layers):
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


def align_right(cache, lengths: torch.Tensor) -> torch.Tensor:
    """Move each row's first `lengths[j]` cached positions to the right end (zeros before); return the mask [k, T]."""
    width = int(lengths.max())
    for layer in cache.layers:
        layer.keys, layer.values = _shift_right(layer.keys, lengths, width), _shift_right(layer.values, lengths, width)
    return (torch.arange(width)[None] >= width - lengths[:, None]).long()  # [k, T] 1 = real token


def _shift_right(t: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:  # t: [k, heads, T, d]
    out = t.new_zeros(t.shape)  # [k, heads, T, d]
    for j, n in enumerate(lengths.tolist()):
        out[j, :, width - n:] = t[j, :, :n]
    return out


PREFILL_GROUP_TOKENS = 1024
"""At most this many (padded) tokens are prefilled in one forward. Short prompts gain from sharing a
forward (33-token rows: 80 ms each in a group of 8, 104 ms alone; CPU time, SmolLM2-135M, one
thread), long ones lose: a forward's activations outgrow the caches, and eight 609-token image
prompts together cost 8% more than one at a time (1761 vs 1622 ms a row), so they go one by one."""


def prefill_groups(lengths: list[int], max_tokens: int = PREFILL_GROUP_TOKENS) -> list[list[int]]:
    """Indices of rows to prefill together: lengths within 1/8 of the group's longest, at most `max_tokens` padded.

    Longest first; each group and the list of groups in index order."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        group = groups[-1] if groups else []
        width = lengths[group[0]] if group else 0
        if group and lengths[i] * 8 >= width * 7 and width * (len(group) + 1) <= max_tokens:
            group.append(i)
        else:
            groups.append([i])
    return sorted(sorted(g) for g in groups)


def early_stop_ids(row: Row, vocab_size: int) -> list[int]:
    """Stop tokens this row may not sample yet (it is short of `min_new_tokens`)."""
    if len(row.generated) >= row.params.min_new_tokens:
        return []
    return [t for t in row.stream.rule.token_ids if t < vocab_size]


def right_pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """ids [B, T], each row followed by `pad_id`s."""
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)  # [B, T]
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids


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
