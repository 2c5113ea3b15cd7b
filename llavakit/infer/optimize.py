"""CPU speed-ups for the language model (the vision tower runs once per image).

Batch-1 decode is a chain of matrix-vector products that must stream every weight from memory
(538 MB per token for SmolLM2-135M in fp32), so what matters is how fast a kernel reads them.
Measured on the reference machine (2 cores, read bandwidth 34 GB/s on two threads, 18 on one):
MKL's and oneDNN's single-row kernels stream 8-17 GB/s on an idle machine, and oneDNN's
prepacked kernel (used here before) fell to 3-6 GB/s on two threads when another process held a
core (each call is a parallel region whose barrier stalls when cores are oversubscribed);
inductor's generated multiply-and-sum reduction over a row-major weight reaches 25-32 GB/s.

- `pack_linears`: linears that read the same input are fused into one product (q/k/v;
  gate/up): half the calls per layer, and the small k/v products get a wide matrix. Each matrix
  is stored as `DenseLinear` in the layout its eager kernel reads fastest on a loaded machine:
  wide ones (out >= in) as [in, out] for `x @ W` (MKL, 10-18 GB/s), narrow ones (down_proj) as
  [out, in] for `F.linear`. Same fp32 math, different summation order (outputs agree to ~1e-6).
- `DecodeStep`: the one-token forward of Llama-family LMs without transformers' per-call
  machinery (mask building, output capture, kwargs plumbing), calling the model's own modules
  and functions (norms, rotary embedding, `apply_rotary_pos_emb`, sdpa attention), so the math
  is transformers'.
- `CompiledDecodeStep`: `DecodeStep` for one row as one `torch.compile` graph, with every
  linear as that reduction; opt-in (`Engine.compile_decode`), as it compiles for tens of seconds.
- `quantize_int8`: dynamic int8 quantization: int8 weights with one scale per output channel,
  activations quantized at run time with one scale per token. Per-token scales matter: PyTorch's
  `quantize_dynamic` uses one (7-bit) scale per whole input tensor, so a prompt's largest
  activation sets the step for every token (and in a batch, rows set each other's): on
  SmolLM2-135M its teacher-forced next-token agreement with fp32 was 54%, per-token 90%
  (weights alone: 98%). Single-token calls (batch-1 decode) go through fbgemm's dynamic linear,
  where one tensor is one token; larger inputs through `torch._int_mm` with per-token scales.
"""

from __future__ import annotations

import sys
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F


class DenseLinear(nn.Module):
    """`nn.Linear` with its fp32 weight in the layout its matrix-vector product reads fastest (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):  # weight: [out, in], bias: [out]
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.transposed = self.out_features >= self.in_features
        w = weight.detach().float()
        w = w.t() if self.transposed else w  # [in, out] for x @ w, else [out, in] for F.linear
        self.register_buffer("matrix", w.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous(), persistent=False)

    @classmethod
    def of(cls, linear: nn.Linear) -> "DenseLinear":
        return cls(linear.weight, linear.bias)

    def to_rows(self) -> None:
        """Store the weight as [out, in] (the layout `CompiledDecodeStep`'s reductions stream)."""
        if self.transposed:
            self.matrix, self.transposed = self.matrix.t().contiguous(), False  # [out, in]

    multirow_weight: torch.Tensor | None = None
    """A oneDNN-prepacked copy of the weight for products of several rows (`prepack_multirow`), or None."""

    def prepack_multirow(self, rows_hint: int) -> None:
        """Route products of more than one row through oneDNN with a prepacked weight copy.

        Why: MKL's sgemm with a few rows (a batched decode step: 8) runs far below both the compute
        and the bandwidth limit (8 rows cost ~3x one row); oneDNN's prepacked kernel does 8 rows for
        1.2-1.5x one row and is 5-10 % faster at prefill sizes (SmolLM2-135M shapes). A single row
        keeps the path below, which is faster there. Same fp32 math in another summation order; it
        costs a second copy of the weight in memory.
        """
        weight = self.matrix.t() if self.transposed else self.matrix  # [out, in]
        self.multirow_weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if not self.transposed and x.numel() == self.in_features and torch.compiler.is_compiling():
            return self._row_reduction(x)
        if (self.multirow_weight is not None and x.numel() != self.in_features and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling()):
            flat = x.reshape(-1, self.in_features)  # [M, in]
            out = torch.ops.mkldnn._linear_pointwise(flat, self.multirow_weight, self.bias, "none", [], "")  # [M, out]
            return out.view(*x.shape[:-1], self.out_features)
        if not self.transposed:
            return F.linear(x, self.matrix, self.bias)
        flat = x.reshape(-1, self.in_features)  # [M, in]
        if self.bias is None:
            out = torch.mm(flat, self.matrix)  # [M, out]
        else:
            out = torch.addmm(self.bias, flat, self.matrix)
        return out.view(*x.shape[:-1], self.out_features)

    def _row_reduction(self, x: torch.Tensor) -> torch.Tensor:  # x: [1.., in] -> [1.., out]
        """One token's product as a multiply-and-sum over rows: inductor emits a vectorised reduction
        split over all threads that streams the weight at close to the machine's read bandwidth
        (MKL's and oneDNN's single-row kernels reach about half of it)."""
        out = (self.matrix * x.reshape(1, self.in_features)).sum(-1)  # [out]
        out = out if self.bias is None else out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        layout = "[in, out] for x @ W" if self.transposed else "[out, in] for F.linear"
        return f"in_features={self.in_features}, out_features={self.out_features}, {layout}"


class FusedLinear(nn.Module):
    """Linears reading the same input as one product; `part(i)` modules stand in for the originals.

    A part computes the fused product for a new input and hands its slice out; the other parts
    called on the same input tensor take their slices of that result (transformers calls q, k, v
    on one `hidden_states`). The result is dropped once every part has had its slice.
    """

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        self.sizes = [lin.out_features for lin in linears]
        weight = torch.cat([lin.weight.detach().float() for lin in linears])  # [sum(out), in]
        biases = [lin.bias for lin in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach().float() if b is not None else torch.zeros(n) for b, n in zip(biases, self.sizes)])  # [sum(out)]
        self.dense = DenseLinear(weight, bias)
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor | None] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # x: [..., in] -> per part [..., out_i]
        return list(self.dense(x).split(self.sizes, dim=-1))

    def part(self, index: int) -> "FusedPart":
        return FusedPart(self, index)

    def slice_for(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part `index`'s output for `x`: one fused product per input tensor, kept until every part took its slice."""
        if x is not self._input or self._outputs[index] is None:
            self._input, self._outputs = x, list(self(x))
        out, self._outputs[index] = self._outputs[index], None
        if all(o is None for o in self._outputs):
            self._input, self._outputs = None, []
        return out


class FusedPart(nn.Module):
    """One of the linears of a `FusedLinear` (its output slice)."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the parent module registers it once
        self.index = index
        self.out_features = fused.sizes[index]
        self.in_features = fused.dense.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self.fused.slice_for(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of a fused linear, out_features={self.out_features}"


FUSED_GROUPS = {
    "self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
    "mlp": ("gate_up_proj", ("gate_proj", "up_proj")),
}
"""Per decoder-layer child: the fused module's name and the linears it replaces."""


def _fuse_layer(layer: nn.Module) -> int:
    count = 0
    for child_name, (fused_name, names) in FUSED_GROUPS.items():
        child = getattr(layer, child_name, None)
        linears = [getattr(child, n, None) for n in names]
        if child is None or any(type(lin) is not nn.Linear for lin in linears):
            continue
        fused = FusedLinear(linears)
        setattr(child, fused_name, fused)
        for i, n in enumerate(names):
            setattr(child, n, fused.part(i))
        count += len(names)
    return count


def _replace_linears(module: nn.Module, make) -> int:
    """Replace every plain `nn.Linear` under `module` by `make(linear)`; return how many.

    Unmerged peft LoRA layers (they have a `base_layer`) are left whole: their forward reads
    `base_layer.weight`, which a replacement does not have."""
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
            count += 1
        elif not hasattr(child, "base_layer"):
            count += _replace_linears(child, make)
    return count


@torch.inference_mode()
def pack_linears(model) -> int:
    """Fuse q/k/v and gate/up, and lay out every LM linear and the LM head for decode; return how many.

    Only fp32 models (others are left as they are: 0)."""
    if model.dtype != torch.float32:
        return 0
    lm = model.model.language_model
    count = sum(_fuse_layer(layer) for layer in lm.layers)
    holder = nn.ModuleDict({"lm": lm, "head": model.lm_head})
    count += _replace_linears(holder, DenseLinear.of)
    model.lm_head = holder["head"]
    return count


class Int8Linear(nn.Module):
    """Dynamic int8 linear: per-channel int8 weights, per-token int8 activations (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()  # [out, in]
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # [out, in]
        bias = None if linear.bias is None else linear.bias.detach().float()  # [out]
        self.register_buffer("weight_t", q.t().contiguous(), persistent=False)  # [in, out] for _int_mm
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized-tensor creation is flagged as deprecated
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            self._fbgemm = torch.ops.quantized.linear_prepack(qw, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features).float()  # [M, in]
        if flat.shape[0] == 1:  # one token: fbgemm's per-tensor scale is a per-token scale
            out = torch.ops.quantized.linear_dynamic(flat, self._fbgemm, True)  # [1, out]
        else:
            step = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0  # [M, 1]
            xq = torch.round(flat / step).clamp(-127, 127).to(torch.int8)  # [M, in]
            out = torch._int_mm(xq, self.weight_t).float() * step * self.scale  # [M, out]
            if self.bias is not None:
                out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-token dynamic"


@torch.inference_mode()
def quantize_int8(model) -> int:
    """Replace the LM's linears and the LM head with `Int8Linear`; return how many were replaced."""
    if model.dtype != torch.float32:
        raise ValueError(f"int8 quantization needs fp32 weights, the model is {model.dtype}")
    holder = nn.ModuleDict({"lm": model.model.language_model, "head": model.lm_head})
    count = _replace_linears(holder, Int8Linear)
    model.lm_head = holder["head"]
    return count


def linear_summary(model) -> dict[str, int]:
    """How many linears of each kind the LM and head use (for logs and tests); fused parts count one each."""
    modules = [*model.model.language_model.modules(), model.lm_head]
    inner = {id(m.dense) for m in modules if isinstance(m, FusedLinear)}
    kinds: dict[str, int] = {}
    for m in modules:
        kind = {nn.Linear: "fp32", DenseLinear: "dense", FusedPart: "fused", Int8Linear: "int8"}.get(type(m))
        if kind is not None and id(m) not in inner:
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


DECODE_STEP_MODELS = ("llama", "qwen2")
"""LM families whose decoder layer `DecodeStep` reproduces (pre-norm, rotary, GQA sdpa, gated MLP)."""


def decode_step_unsupported(model) -> str | None:
    """Why `DecodeStep` cannot run this model, or None when it can."""
    config = model.config.text_config
    if config.model_type not in DECODE_STEP_MODELS:
        return f"LM type {config.model_type!r} (supported: {', '.join(DECODE_STEP_MODELS)})"
    if config._attn_implementation != "sdpa":
        return f"attention implementation {config._attn_implementation!r} (needs 'sdpa')"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in ("default", "linear", "llama3"):
        return f"rope type {rope!r} (its frequencies depend on the sequence length)"
    return None


class DecodeStep:
    """One token per row through a Llama-family LM and its head: logits [b, V].

    The same computation as `LlavaForConditionalGeneration.forward` for a text token with a KV
    cache, in the same order, through the model's own modules (so packed, fused or int8 linears
    are used as installed) and transformers' own rotary and sdpa functions. What it leaves out is
    per-call plumbing; the attention mask is built here: None when no row is padded, else
    transformers' boolean [b, 1, 1, L] form.
    """

    def __init__(self, model):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        reason = decode_step_unsupported(model)
        if reason is not None:
            raise ValueError(f"no fast decode step for this model: {reason}")
        self.lm = model.model.language_model
        self.head = model.lm_head
        self.layers = [(layer, _apply_rotary(layer.self_attn)) for layer in self.lm.layers]
        self.attention = sdpa_attention_forward

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, mask: torch.Tensor | None) -> torch.Tensor:
        """tokens, positions: [b, 1]; cache: a DynamicCache holding L-1 positions; mask: [b, L] (1 = real) or None."""
        h = self.lm.embed_tokens(tokens)  # [b, 1, D]
        rope = self.lm.rotary_emb(h, positions)  # cos, sin: [b, 1, head_dim]
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]  # [b, 1, 1, L]
        for i, (layer, rotary) in enumerate(self.layers):
            h = h + self._attend(layer.self_attn, rotary, layer.input_layernorm(h), rope, cache.layers[i], attn_mask)
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h))  # [b, 1, D]
        return self.head(self.lm.norm(h))[:, -1].float()  # [b, V]

    def _attend(self, attn, rotary, x, rope, layer_cache, mask) -> torch.Tensor:  # x: [b, 1, D] -> [b, 1, D]
        b = x.shape[0]
        q, k, v = _qkv(attn, x)  # [b, 1, H*hd], [b, 1, KV*hd], [b, 1, KV*hd]
        q = q.view(b, 1, -1, attn.head_dim).transpose(1, 2)  # [b, H, 1, hd]
        k = k.view(b, 1, -1, attn.head_dim).transpose(1, 2)  # [b, KV, 1, hd]
        v = v.view(b, 1, -1, attn.head_dim).transpose(1, 2)  # [b, KV, 1, hd]
        q, k = rotary(q, k, *rope)
        k, v = layer_cache.update(k, v)  # [b, KV, L, hd]
        out, _ = self.attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)  # [b, 1, H, hd]
        return attn.o_proj(out.reshape(b, 1, -1))  # [b, 1, D]

    @staticmethod
    def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:  # x: [b, 1, D] -> [b, 1, D]
        fused = getattr(mlp, "gate_up_proj", None)
        gate, up = fused(x) if isinstance(fused, FusedLinear) else (mlp.gate_proj(x), mlp.up_proj(x))  # [b, 1, I]
        return mlp.down_proj(mlp.act_fn(gate) * up)


def compiled_step_supported(model) -> bool:
    """`CompiledDecodeStep` can run this model: a supported LM whose linears are all packed (fp32)."""
    kinds = linear_summary(model)
    return decode_step_unsupported(model) is None and bool(kinds) and not kinds.keys() - {"dense", "fused"}


class CompiledDecodeStep(DecodeStep):
    """`DecodeStep` for one row, as one `torch.compile` graph (inductor's C++ backend).

    Every linear becomes a multiply-and-sum reduction over its [out, in] weight (see
    `DenseLinear._row_reduction`), and the norms, rotary embedding and residual adds fuse into a
    few loops, so the per-op dispatch of the eager step disappears. The KV cache is the
    `SlabLayer` buffers, passed whole: the new position is written in place and attention runs
    over the buffer's full capacity with a mask (the capacity dimension is compiled as dynamic,
    so a growing cache does not recompile). It needs `pack_linears` first (fp32 `DenseLinear`s),
    and it re-lays them out as [out, in], which the eager paths also use. Compiling takes tens
    of seconds at the first call; `compile_seconds` records it.

    Why not transformers' own compiled decoding (`generate` with a `StaticCache`): that cache
    preallocates a fixed batch and maximum length and cannot be cropped, which the chat session
    (crop to the reused prefix) needs. The reductions sum in another order than the eager
    products, so greedy tokens can differ at near-ties (tests check they match on the tiny model).
    """

    def __init__(self, model):
        super().__init__(model)
        if not compiled_step_supported(model):
            raise ValueError("a compiled decode step needs the LM's linears packed (pack_linears, fp32)")
        for m in (*self.lm.modules(), self.head):
            if isinstance(m, DenseLinear):
                m.to_rows()
        self.graph = torch.compile(self._graph, dynamic=None)
        self.compile_seconds: float | None = None

    def __call__(self, tokens, positions, kbufs: list, vbufs: list, slot: int) -> torch.Tensor:
        """tokens, positions: [1, 1]; k/vbufs: per layer [1, KV, capacity, hd], written at `slot`; logits [1, V]."""
        for buf in (*kbufs, *vbufs):
            torch._dynamo.mark_dynamic(buf, 2)
        start = time.perf_counter()
        logits = self.graph(tokens, positions, kbufs, vbufs, torch.tensor([slot]))
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
        return logits

    def _graph(self, tokens, positions, kbufs, vbufs, slot) -> torch.Tensor:
        h = self.lm.embed_tokens(tokens)  # [1, 1, D]
        rope = self.lm.rotary_emb(h, positions)  # cos, sin: [1, 1, head_dim]
        mask = (torch.arange(kbufs[0].shape[2]) <= slot).view(1, 1, 1, -1)  # [1, 1, 1, capacity]
        for i, (layer, rotary) in enumerate(self.layers):
            kv = (kbufs[i], vbufs[i], slot)
            h = h + self._attend(layer.self_attn, rotary, layer.input_layernorm(h), rope, kv, mask)
            h = h + self._mlp(layer.mlp, layer.post_attention_layernorm(h))  # [1, 1, D]
        return self.head(self.lm.norm(h))[:, -1].float()  # [1, V]

    def _attend(self, attn, rotary, x, rope, kv, mask) -> torch.Tensor:  # x: [1, 1, D] -> [1, 1, D]
        kbuf, vbuf, slot = kv
        q, k, v = _qkv(attn, x)  # [1, 1, H*hd], [1, 1, KV*hd], [1, 1, KV*hd]
        q = q.view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, H, 1, hd]
        k = k.view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, KV, 1, hd]
        v = v.view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, KV, 1, hd]
        q, k = rotary(q, k, *rope)
        kbuf.index_copy_(2, slot, k)  # [1, KV, capacity, hd]
        vbuf.index_copy_(2, slot, v)
        out = F.scaled_dot_product_attention(q, kbuf, vbuf, attn_mask=mask, scale=attn.scaling,
                                             enable_gqa=True)  # [1, H, 1, hd]
        return attn.o_proj(out.transpose(1, 2).reshape(1, 1, -1))  # [1, 1, D]


def _qkv(attn, x: torch.Tensor) -> list[torch.Tensor]:
    fused = getattr(attn, "qkv_proj", None)
    if isinstance(fused, FusedLinear):
        return fused(x)
    return [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]


def _apply_rotary(attn):
    """The `apply_rotary_pos_emb` of the attention module's own modeling file."""
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb
