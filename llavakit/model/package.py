"""Ship a trained model small, and rebuild the full HF-native model from the shipped parts.

Used by the recipe's package step (llavakit/recipe/package.py) and by the shipped default model
(llavakit/default_model), which is why it lives with the model code and not with the recipe.

`package_model` / `write_package` extract from a LoRA-trained instruct run what differs from the
base language model: the vision tower, the LoRA adapter (with the projector as a saved module),
the embedding rows of the tokens the model added (`<image>`, ...), and the config, tokenizer,
processor and chat template. Weights are safetensors; `manifest.json` lists every file's sha256,
the base LM (short name and the sha256 of its weights), a digest of the trained model's
tensors, and the recipe.

`materialize` rebuilds the model dir from those parts + the base LM exactly as the trainer's
export does (same parts, LoRA merged by peft), checks every input against the manifest and the
result's tensors against the recorded digest, and writes it atomically into
`<cache>/models/<name>-<hash>`, reused from then on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from llavakit.fsutil import swap_dir

MANIFEST = "manifest.json"
DONE = ".materialized.json"
WEIGHT_FILES = ("vision.safetensors", "embeddings.safetensors")
COPY_SUFFIXES = (".json", ".jinja", ".txt")
SKIP = {"model.safetensors.index.json", MANIFEST}


class PackageError(ValueError):
    """A package that is incomplete, altered, or does not fit the base model."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_digest(state: dict) -> str:
    """sha256 over the sorted tensor names, dtypes, shapes and raw bytes (ties counted once per name)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_tensors_digest(path: Path) -> str:
    from safetensors.torch import load_file

    return tensors_digest(load_file(str(path)))


def write_package(instruct_dir: Path, out: Path, *, base_lm: str, base_lm_dir: Path, recipe: dict | None = None,
                  extra: dict | None = None) -> dict:
    """Write the shipped parts of the LoRA run `instruct_dir` (holding model/ and adapter/) into `out`."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    instruct_dir, out = Path(instruct_dir), Path(out)
    model_dir, adapter_dir = instruct_dir / "model", instruct_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise PackageError(f"{adapter_dir}: no LoRA adapter (train the instruct stage with lora.enabled and lora.save_adapter)")
    state = load_file(str(model_dir / "model.safetensors"))
    base_cfg = AutoConfig.from_pretrained(base_lm_dir)
    base_vocab = int(base_cfg.vocab_size)
    embed_key = next((k for k in state if k.endswith("embed_tokens.weight")), None)
    if embed_key is None:
        raise PackageError(f"{model_dir}: no embed_tokens weight")
    vocab = state[embed_key].shape[0]
    if vocab < base_vocab:
        raise PackageError(f"{model_dir}: {vocab} embedding rows, fewer than the base LM's {base_vocab}")
    vision = {k: v for k, v in state.items() if k.startswith("model.vision_tower.")}
    if not vision:
        raise PackageError(f"{model_dir}: no vision tower weights")
    new_rows = {"embed_tokens": state[embed_key][base_vocab:].clone()}
    if "lm_head.weight" in state and not getattr(base_cfg, "tie_word_embeddings", False):
        new_rows["lm_head"] = state["lm_head.weight"][base_vocab:].clone()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=_parent(out)))
    try:
        save_file({k: v.contiguous() for k, v in vision.items()}, str(tmp / "vision.safetensors"), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in new_rows.items()}, str(tmp / "embeddings.safetensors"), metadata={"format": "pt"})
        # not peft's README.md: a template model card with placeholders (the card is docs/default-model.md)
        shutil.copytree(adapter_dir, tmp / "adapter", ignore=shutil.ignore_patterns("README.md"))
        _sort_target_modules(tmp / "adapter" / "adapter_config.json")
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.suffix in COPY_SUFFIXES and f.name not in SKIP:
                shutil.copy2(f, tmp / f.name)
        base_weights = sorted(Path(base_lm_dir).glob("*.safetensors"))
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": "llavakit-package", "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # the base weights' tensors (not file bytes: another safetensors writer may lay them out differently)
            "base_lm": {"name": base_lm, "vocab_size": base_vocab,
                        "tensors_sha256": {p.name: file_tensors_digest(p) for p in base_weights}},
            "vocab_size": int(vocab), "files": files,
            "model_tensors_sha256": tensors_digest(state),
            "size_bytes": sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()),
            "recipe": recipe, **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
        swap_dir(tmp, out)  # the old package stays on disk until the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _sort_target_modules(config: Path) -> None:
    """peft writes `target_modules` from a set, in a new order on every save: sorted, a package of the same
    weights is the same bytes (and a shipped model's diff shows only what changed)."""
    data = json.loads(config.read_text(encoding="utf-8"))
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _parent(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent


def read_manifest(package: Path) -> dict:
    file = Path(package) / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{package}: no {MANIFEST} (not a llavakit package)")
    return json.loads(file.read_text(encoding="utf-8"))


def verify_files(package: Path, manifest: dict) -> None:
    """Every listed file present with its sha256 (and nothing listed missing)."""
    for rel, digest in manifest["files"].items():
        path = Path(package) / rel
        if not path.is_file():
            raise PackageError(f"{package}: {rel} is missing")
        if sha256_file(path) != digest:
            raise PackageError(f"{package}: {rel} does not match its sha256 in {MANIFEST} (altered or corrupt)")


def package_id(manifest: dict) -> str:
    return hashlib.sha256(json.dumps([manifest["files"], manifest["base_lm"], manifest["model_tensors_sha256"]],
                                     sort_keys=True).encode()).hexdigest()[:16]


def default_target(package: Path, manifest: dict, name: str) -> Path:
    from llavakit.model.hub import cache_dir

    return cache_dir() / "models" / f"{name}-{package_id(manifest)}"


def materialize(package: Path, *, name: str = "default", target: Path | None = None, base_lm_dir: Path | None = None,
                progress: Callable[[str], None] | None = None) -> Path:
    """The full model dir for `package` (built once, verified, atomic; reused when already there)."""
    say = progress or (lambda msg: None)
    package = Path(package)
    manifest = read_manifest(package)
    target = Path(target) if target else default_target(package, manifest, name)
    if _built(target, manifest):
        return target
    with _exclusive(_parent(target) / f".{target.name}.lock"):  # two first uses: one builds, the other waits
        if _built(target, manifest):
            return target
        return _materialize(package, manifest, target, base_lm_dir, say)


def _built(target: Path, manifest: dict) -> bool:
    done = target / DONE
    return done.is_file() and json.loads(done.read_text()).get("package_id") == package_id(manifest)


@contextmanager
def _exclusive(lock: Path):
    """An exclusive flock on `lock` (released by the kernel if the process dies)."""
    import fcntl

    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _materialize(package: Path, manifest: dict, target: Path, base_lm_dir: Path | None, say) -> Path:
    t0 = time.perf_counter()
    say(f"checking {len(manifest['files'])} shipped files against {package / MANIFEST}")
    verify_files(package, manifest)
    if base_lm_dir is None:
        from llavakit.model.hub import resolve_lm

        say(f"base language model: {manifest['base_lm']['name']} (converted into the cache on first use)")
        base_lm_dir = Path(resolve_lm(manifest["base_lm"]["name"]))
    base_lm_dir = Path(base_lm_dir)
    say(f"checking the base language model's weights in {base_lm_dir}")
    for fname, digest in manifest["base_lm"]["tensors_sha256"].items():
        path = base_lm_dir / fname
        if not path.is_file() or file_tensors_digest(path) != digest:
            raise PackageError(f"base LM {base_lm_dir}: {fname} differs from the one the package was trained on")
    say("assembling vision tower + projector + LoRA-merged language model")
    model, tokenizer, processor, has_cls = assemble(package, manifest, base_lm_dir)
    say(f"writing {target}")
    from llavakit.model.io import save_model

    tmp_parent = _parent(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=tmp_parent))
    try:
        built = save_model(model, tokenizer, processor, staging / "model", has_cls=has_cls)
        if file_tensors_digest(built / "model.safetensors") != manifest["model_tensors_sha256"]:
            raise PackageError(f"the model rebuilt from {package} differs from the trained one (tensor digest mismatch)")
        (built / DONE).write_text(json.dumps({"package_id": package_id(manifest), "package": str(package.resolve()),
                                              "seconds": time.perf_counter() - t0}) + "\n")
        swap_dir(built, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"materialised in {time.perf_counter() - t0:.0f} s")
    return target


def assemble(package: Path, manifest: dict, base_lm_dir: Path):
    """(merged model, tokenizer, image processor, has_cls) from the package and the base LM."""
    import warnings

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, LlavaConfig

    from llavakit.model.io import has_cls_token
    from llavakit.model.modeling import LlavakitForConditionalGeneration

    config = LlavaConfig.from_pretrained(package)
    tokenizer = AutoTokenizer.from_pretrained(package)
    processor = AutoImageProcessor.from_pretrained(package)
    lm = AutoModelForCausalLM.from_pretrained(base_lm_dir, dtype=torch.float32)
    base_vocab = manifest["base_lm"]["vocab_size"]
    if lm.get_input_embeddings().weight.shape[0] != base_vocab:
        raise PackageError(f"base LM {base_lm_dir}: vocab {lm.get_input_embeddings().weight.shape[0]}, package expects {base_vocab}")
    rows = load_file(str(package / "embeddings.safetensors"))
    lm.resize_token_embeddings(manifest["vocab_size"], mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[base_vocab:] = rows["embed_tokens"]
        if "lm_head" in rows:
            lm.get_output_embeddings().weight[base_vocab:] = rows["lm_head"]
    model = LlavakitForConditionalGeneration(config)
    model.model.language_model.load_state_dict(lm.base_model.state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    vision = load_file(str(package / "vision.safetensors"))
    prefix = "model.vision_tower."
    model.model.vision_tower.load_state_dict({k[len(prefix):]: v for k, v in vision.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(package / "adapter"))
        model = peft_model.merge_and_unload()
    model.eval()
    return model, tokenizer, processor, has_cls_token(model.config)
