"""CPU speed-ups for the language model's linear layers (the vision tower runs once per image).

- `pack_linears`: fp32 weights reordered once into oneDNN's blocked layout. Decode is a chain of
  matrix-vector products; PyTorch's default path (MKL sgemv on [out, in] weights, one thread)
  reads them at ~9 GB/s on the reference machine, oneDNN's prepacked kernel (all threads) at
  ~16 GB/s. This is the kernel `torch.compile`'s CPU backend uses for frozen linears; we call it
  without compiling. Same fp32 math, different summation order (outputs agree to ~1e-5).
- `quantize_int8`: dynamic int8 quantization: int8 weights with one scale per output channel,
  activations quantized at run time with one scale per token. Per-token scales matter: PyTorch's
  `quantize_dynamic` uses one (7-bit) scale per whole input tensor, so a prompt's largest
  activation sets the step for every token (and in a batch, rows set each other's): on
  SmolLM2-135M its teacher-forced next-token agreement with fp32 was 54%, per-token 90%
  (weights alone: 98%). Single-token calls (batch-1 decode) go through fbgemm's dynamic linear,
  where one tensor is one token; larger inputs through `torch._int_mm` with per-token scales.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight prepacked for oneDNN (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().contiguous()  # [out, in]
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, 1), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()  # [out]
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked"


def packing_available() -> bool:
    """oneDNN prepacked linears exist in this torch build and agree with `F.linear`."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        lin = nn.Linear(24, 40)
        x = torch.randn(3, 24)
        with torch.inference_mode():
            ok = torch.allclose(PackedLinear(lin)(x), lin(x), atol=1e-4, rtol=1e-4)
    except (RuntimeError, AttributeError):
        return False
    return bool(ok)


PACK_MIN_ELEMENTS = 1 << 18
"""Smaller weights (under 1 MiB in fp32) stay as they are: they sit in cache, so packing gains nothing,
and each oneDNN call is a parallel region whose barrier is costly when the cores are oversubscribed."""


def _replace_linears(module: nn.Module, make, min_elements: int) -> int:
    count = 0
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            if child.weight.numel() >= min_elements:
                setattr(module, name, make(child))
                count += 1
        else:
            count += _replace_linears(child, make, min_elements)
    return count


@torch.inference_mode()
def pack_linears(model, min_elements: int = PACK_MIN_ELEMENTS) -> int:
    """Prepack the LM's linears and the LM head (those with >= `min_elements` weights); return the count."""
    if model.dtype != torch.float32 or not packing_available():
        return 0
    holder = nn.ModuleDict({"lm": model.model.language_model, "head": model.lm_head})
    count = _replace_linears(holder, PackedLinear, min_elements)
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
    count = _replace_linears(holder, Int8Linear, 0)
    model.lm_head = holder["head"]
    return count


def linear_summary(model) -> dict[str, int]:
    """How many linears of each kind the LM and head use (for logs and tests)."""
    kinds: dict[str, int] = {}
    for m in [*model.model.language_model.modules(), model.lm_head]:
        kind = {nn.Linear: "fp32", PackedLinear: "packed", Int8Linear: "int8"}.get(type(m))
        if kind is not None:
            kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
