"""CPU speed-ups for the language model's linear layers (the vision tower runs once per image).

- `pack_linears`: fp32 weights reordered once into oneDNN's blocked layout. Decode is a chain of
  matrix-vector products; PyTorch's default path (MKL sgemm on [out, in] weights) reads them at
  ~9 GB/s on the reference machine, oneDNN's prepacked kernel at ~16 GB/s (bench/decode.py).
  This is the kernel `torch.compile`'s CPU backend uses for frozen linears; we call it without
  compiling. Same fp32 math, different summation order (outputs agree to ~1e-5).
- `quantize_int8`: dynamic int8 quantization (per-channel int8 weights, activations quantized per
  call), PyTorch's own `quantize_dynamic`.
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


def quantize_int8(model) -> int:
    """Dynamic int8 quantization of the LM's linears and the LM head; return how many were replaced."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if model.dtype != torch.float32:
        raise ValueError(f"int8 quantization needs fp32 weights, the model is {model.dtype}")
    spec = {nn.Linear: per_channel_dynamic_qconfig}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice points at torchao, not installed here
        quantize_dynamic(model.model.language_model, spec, dtype=torch.qint8, inplace=True)
        model.lm_head = quantize_dynamic(nn.Sequential(model.lm_head), spec, dtype=torch.qint8, inplace=True)[0]
    return sum(1 for m in model.model.language_model.modules() if _is_dynamic_quantized(m)) + 1


def _is_dynamic_quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.ao.nn.quantized.dynamic")


def linear_summary(model) -> dict[str, int]:
    """How many linears of each kind the LM and head use (for logs and tests)."""
    kinds: dict[str, int] = {}
    for m in [*model.model.language_model.modules(), model.lm_head]:
        if isinstance(m, (nn.Linear, PackedLinear)) or _is_dynamic_quantized(m):
            name = "int8" if _is_dynamic_quantized(m) else ("packed" if isinstance(m, PackedLinear) else "fp32")
            kinds[name] = kinds.get(name, 0) + 1
    return kinds
