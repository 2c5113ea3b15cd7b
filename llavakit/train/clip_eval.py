"""Evaluating a stage-0 encoder: zero-shot retrieval and linear probes per attribute.

- Retrieval: every caption of the first `val_images` images of a held-out world is a query over
  those images (text→image recall@1/@5); image→text recall@1 too.
- Probes: what the LLaVA model will read. Features are the mean over patches of layer −2 (CLS
  dropped, exactly the tokens `vision_feature_layer=-2, strategy=default` hands the projector), and,
  for reference, the pooled projected embedding. A mean over patches keeps *what* is there but
  blurs *where*, while LLaVA sees every patch token in order, so a third feature keeps the layout:
  the same layer −2 patch tokens average-pooled to a 4x4 grid and concatenated ('patch_grid').
  Four probe worlds are generated with the same world settings as the held-out world (text and
  charts off): single-object scenes label colour, shape and 3x3 position; scenes of 1–5 objects
  label count. Probes are fit on one world (val split stream) and tested on another (test split
  stream), so no probe image is a training image.
  A probe is multinomial logistic regression on standardised features (L-BFGS), its L2 strength
  picked on a 20 % hold-out of the fit set. Chance is reported both as 1/K and as the
  majority-class rate of the test set.
- `--model` may also be a LLaVA model dir (e.g. the default model, whose tower its instruct stage
  fine-tunes): then its tower alone is probed (no text tower, so no retrieval).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVAL_FILE = "eval.json"
BASELINE_FILE = "eval_random_init.json"  # so a baseline never overwrites the trained encoder's eval.json
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "count", "position")
FEATURES: tuple[str, ...] = ("patch_mean", "patch_grid", "pooled")
GRID = 4  # patch_grid: layer −2 patch tokens average-pooled to GRID x GRID cells, concatenated
L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
COUNT_RANGE = (1, 5)


@dataclass
class EvalConfig:
    """What to evaluate and how much."""

    model: str
    """HF CLIP checkpoint dir (a `llavakit train clip` output)."""
    world: str
    """Held-out world dir (val split); its world.json settings also shape the probe worlds."""
    out: str | None = None
    """Where eval.json goes (default: the model dir)."""
    val_images: int = 500
    """Images of `world` used for retrieval."""
    probe_fit_images: int = 2000
    """Images per probe world fit on (0 skips the probes)."""
    probe_test_images: int = 1000
    """Images per probe world tested on."""
    probe_seed: int = 1000
    """World seed of the probe worlds."""
    probe_dir: str | None = None
    """Where to generate the probe worlds (default: a temporary dir, removed afterwards)."""
    random_init: bool = False
    """Evaluate an untrained model of the same architecture instead (a baseline)."""
    batch_size: int = 256
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("val_images", "probe_test_images", "batch_size", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.probe_fit_images < 0 or self.probe_seed < 0:
            raise ValueError("probe_fit_images and probe_seed must be >= 0")

    @classmethod
    def from_train(cls, cfg) -> EvalConfig:
        """The evaluation a `ClipTrainConfig` asks for after training."""
        return cls(model=cfg.out, world=cfg.val_world, val_images=cfg.val_images, probe_fit_images=cfg.probe_fit_images,
                   probe_test_images=cfg.probe_test_images, probe_seed=cfg.probe_seed, threads=cfg.threads)  # fmt: skip


# --- model and features -----------------------------------------------------------------


def load_encoder(model_dir: str | Path, random_init: bool = False, seed: int = 0):
    """(CLIPModel in eval mode, CLIPTokenizer) of a checkpoint dir; random_init keeps only its config."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    if random_init:
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig.from_pretrained(model_dir))
    else:
        model = CLIPModel.from_pretrained(model_dir)
    return model.eval(), CLIPTokenizer.from_pretrained(model_dir)


def is_llava_dir(model_dir: str | Path) -> bool:
    """A LLaVA model dir (config model_type 'llava'), e.g. a trained default model, rather than a CLIP checkpoint."""
    config = Path(model_dir) / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "llava"


def load_llava_tower(model_dir: str | Path):
    """The vision tower of a LLaVA model dir, in eval mode: probing it shows what a tuned tower carries."""
    from llavakit.model.io import load_model

    return load_model(model_dir).model.model.vision_tower.eval()


def tower_outputs(model, pixel_values):
    """(hidden states, pooled) of a CLIPModel (pooled: the projected CLIP embedding) or of a bare vision
    tower (pooled: its post-norm CLS)."""
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True)
    else:
        out = model(pixel_values=pixel_values, output_hidden_states=True)
    return out.hidden_states, out.pooler_output


def patch_grid(patches):
    """Patch tokens [B, n*n, D] average-pooled to a GRID x GRID map, flattened: [B, GRID*GRID*D]."""
    import torch

    b, t, d = patches.shape
    n = int(round(t**0.5))
    fmap = patches.transpose(1, 2).reshape(b, d, n, n)  # [B, D, n, n]
    return torch.nn.functional.adaptive_avg_pool2d(fmap, GRID).flatten(1)  # [B, D*GRID*GRID]


def image_features(model, pixels, batch_size: int) -> dict[str, Any]:
    """Features of uint8 pixels: 'patch_mean' [N, Dv] (mean of layer −2 patch tokens), 'patch_grid'
    [N, 16*Dv] (the same tokens pooled to a 4x4 map: where things are) and 'pooled' [N, P] (CLIP embedding)."""
    import torch

    from llavakit.train.clip_data import normalize

    feats: dict[str, list] = {f: [] for f in FEATURES}
    with torch.no_grad():
        for start in range(0, pixels.shape[0], batch_size):
            hidden, pooled = tower_outputs(model, normalize(pixels[start : start + batch_size]))
            patches = hidden[-2][:, 1:, :]  # [B, n*n, Dv] what LLaVA reads (CLS dropped)
            feats["patch_mean"].append(patches.mean(dim=1))  # [B, Dv]
            feats["patch_grid"].append(patch_grid(patches))  # [B, 16*Dv]
            feats["pooled"].append(pooled)  # [B, P]
    return {f: torch.cat(v) for f, v in feats.items()}


def text_embeddings(model, input_ids, batch_size: int):
    """L2-normalised text embeddings [N, P] of EOS-padded ids [N, L]."""
    import torch

    chunks = []
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            chunks.append(model.get_text_features(input_ids=input_ids[start : start + batch_size]).pooler_output)
    emb = torch.cat(chunks)  # [N, P]
    return emb / emb.norm(dim=-1, keepdim=True)


# --- retrieval --------------------------------------------------------------------------


def recall_at(sim, target, ks: tuple[int, ...]) -> dict[int, float]:
    """Fraction of rows of sim [Q, N] whose target column ranks within the top k (ties favour the target)."""
    import torch

    correct = sim[torch.arange(sim.shape[0]), target].unsqueeze(1)  # [Q, 1]
    rank = (sim > correct).sum(dim=1)  # [Q]
    return {k: (rank < k).float().mean().item() for k in ks}


def retrieval(model, data, batch_size: int) -> dict[str, Any]:
    """Text→image recall@1/@5 with every caption as a query, image→text recall@1."""
    import torch

    n, c, length = data.input_ids.shape
    images = image_features(model, data.pixels, batch_size)["pooled"]  # [N, P]
    images = images / images.norm(dim=-1, keepdim=True)
    texts = text_embeddings(model, data.input_ids.reshape(n * c, length), batch_size)  # [N*C, P]
    sim = texts @ images.T  # [N*C, N]
    owner = torch.arange(n).repeat_interleave(c)  # [N*C] image of each caption
    t2i = recall_at(sim, owner, (1, 5))
    best_text = sim.T.argmax(dim=1)  # [N]
    i2t_r1 = (owner[best_text] == torch.arange(n)).float().mean().item()
    return {"images": n, "queries": n * c, "t2i_r1": t2i[1], "t2i_r5": t2i[5], "i2t_r1": i2t_r1,
            "t2i_r1_chance": 1.0 / n}  # fmt: skip


# --- probe worlds -----------------------------------------------------------------------


def probe_world_configs(base: dict[str, Any], cfg: EvalConfig, root: Path) -> dict[str, Any]:
    """The four probe WorldConfigs: {single,count} x {fit,test}, shaped like the held-out world."""
    from llavakit.world import WorldConfig

    common = dict(base, seed=cfg.probe_seed, text_prob=0.0, chart_prob=0.0, clipart_prob=0.0)
    kinds = {"single": dict(min_objects=1, max_objects=1), "count": dict(min_objects=COUNT_RANGE[0], max_objects=COUNT_RANGE[1])}
    parts = {"fit": ("val", cfg.probe_fit_images), "test": ("test", cfg.probe_test_images)}
    return {
        f"{kind}_{part}": WorldConfig(out=root / f"{kind}_{part}", **dict(common, **objs, split=split, num_images=n))
        for kind, objs in kinds.items()
        for part, (split, n) in parts.items()
    }


def probe_labels(scenes: list[dict], attribute: str) -> list[str]:
    """Each scene's label for an attribute (single-object scenes for colour/shape/position)."""
    if attribute == "count":
        return [str(len(s["objects"])) for s in scenes]
    key = {"color": "color", "shape": "category", "position": "position"}[attribute]
    return [str(s["objects"][0][key]) for s in scenes]


def fit_logistic(x, y, num_classes: int, l2: float, iters: int = 100):
    """Multinomial logistic regression (L-BFGS); returns (W [D, K], b [K])."""
    import torch

    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)  # [D, K]
    b = torch.zeros(num_classes, requires_grad=True)  # [K]
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + l2 * (w * w).sum()  # [N, K] logits
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def accuracy(x, y, wb) -> float:
    w, b = wb
    return ((x @ w + b).argmax(dim=1) == y).float().mean().item()  # [N, K] → [N]


def linear_probe(fit_x, fit_y: list[str], test_x, test_y: list[str]) -> dict[str, Any]:
    """Fit on (fit_x, fit_y), choose L2 on a hold-out, report test accuracy against chance."""
    import torch

    classes = sorted(set(fit_y) | set(test_y))
    to_id = {c: i for i, c in enumerate(classes)}
    ya = torch.tensor([to_id[c] for c in fit_y])  # [N]
    yb = torch.tensor([to_id[c] for c in test_y])  # [M]
    mean, std = fit_x.mean(dim=0), fit_x.std(dim=0) + 1e-6
    xa, xb = (fit_x - mean) / std, (test_x - mean) / std  # [N, D], [M, D]
    cut = int(0.8 * len(ya))
    scores = {l2: accuracy(xa[cut:], ya[cut:], fit_logistic(xa[:cut], ya[:cut], len(classes), l2)) for l2 in L2_GRID}
    l2 = max(L2_GRID, key=lambda v: (scores[v], v))
    acc = accuracy(xb, yb, fit_logistic(xa, ya, len(classes), l2))
    majority = max(test_y.count(c) for c in classes) / len(test_y)
    return {"acc": acc, "chance": 1.0 / len(classes), "majority": majority, "classes": len(classes),
            "fit": len(ya), "test": len(yb), "l2": l2}  # fmt: skip


def generate_probe_worlds(cfg: EvalConfig, root: Path) -> dict[str, Path]:
    """Generate the probe worlds under root; {name: dir}."""
    from llavakit.world import generate_world
    from llavakit.world.load import load_world_info

    base = load_world_info(cfg.world)["config"]
    dirs = {}
    for name, wc in probe_world_configs(base, cfg, root).items():
        generate_world(wc)
        dirs[name] = wc.out
    return dirs


def probes(model, cfg: EvalConfig, image_size: int, say) -> dict[str, dict[str, Any]]:
    """{feature: {attribute: probe result}} for both feature kinds and all four attributes."""
    from llavakit.train.clip_data import load_world_images

    with tempfile.TemporaryDirectory(prefix="llavakit-probes-") as tmp:
        root = Path(cfg.probe_dir) if cfg.probe_dir else Path(tmp)
        t0 = time.perf_counter()
        dirs = generate_probe_worlds(cfg, root)
        say(f"generated probe worlds in {time.perf_counter() - t0:.1f}s")
        feats, labels = {}, {}
        for name, directory in dirs.items():
            pixels, scenes = load_world_images(directory, image_size, workers=cfg.threads)
            feats[name] = image_features(model, pixels, cfg.batch_size)
            attrs = ("count",) if name.startswith("count") else ("color", "shape", "position")
            labels[name] = {a: probe_labels(scenes, a) for a in attrs}
    report: dict[str, dict[str, Any]] = {f: {} for f in FEATURES}
    for attr in ATTRIBUTES:
        kind = "count" if attr == "count" else "single"
        for f in FEATURES:
            fit, test = f"{kind}_fit", f"{kind}_test"
            report[f][attr] = linear_probe(feats[fit][f], labels[fit][attr], feats[test][f], labels[test][attr])
    return report


# --- report -----------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table printed by `llavakit train clip --eval`."""
    r = report["retrieval"]
    lines = [f"encoder {report['model']}{' (random init)' if report['random_init'] else ''}: "
             f"{report['params']['vision'] / 1e6:.2f}M vision params, {report['image_tokens']} patch tokens"]
    if r is None:
        lines.append("a LLaVA model's vision tower: no text tower, so no retrieval; 'pooled' is its post-norm CLS")
    else:
        lines.append(f"zero-shot text->image on {r['images']} held-out images ({r['queries']} captions): "
                     f"R@1 {r['t2i_r1']:.3f}  R@5 {r['t2i_r5']:.3f}  (image->text R@1 {r['i2t_r1']:.3f}; "
                     f"chance R@1 {r['t2i_r1_chance']:.3f})")  # fmt: skip
    if report.get("probes"):
        lines.append(f"{'linear probe':<14}{'patch mean (layer -2)':>22}{'4x4 patch grid':>16}{'pooled':>8}"
                     f"{'1/K':>8}{'majority':>10}")  # fmt: skip
        for attr in ATTRIBUTES:
            pm, pg, po = (report["probes"][f][attr] for f in FEATURES)
            lines.append(f"{attr:<14}{pm['acc']:>22.3f}{pg['acc']:>16.3f}{po['acc']:>8.3f}{pm['chance']:>8.3f}"
                         f"{pm['majority']:>10.3f}")  # fmt: skip
    return "\n".join(lines)


def evaluate(model_dir: str | Path, cfg: EvalConfig, say=None, train_seconds: float | None = None) -> dict[str, Any]:
    """Run retrieval and probes and write eval.json (or eval_random_init.json); returns the report."""
    import torch

    from llavakit.world.load import check_world

    say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_world(cfg.world)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        report = _evaluate(model_dir, cfg, say)
    finally:
        torch.set_num_threads(threads)
    if train_seconds is not None:
        report["train_seconds"] = round(train_seconds, 1)
    out = Path(cfg.out) if cfg.out else Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = BASELINE_FILE if cfg.random_init else EVAL_FILE
    (out / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _evaluate(model_dir: str | Path, cfg: EvalConfig, say) -> dict[str, Any]:
    from llavakit.train.clip import count_params
    from llavakit.train.clip_data import load_world

    t0 = time.perf_counter()
    if is_llava_dir(model_dir):  # a LLaVA model's (possibly fine-tuned) tower: probes only, no text tower to retrieve with
        if cfg.random_init:
            raise ValueError(f"--random-init needs a CLIP checkpoint; {model_dir} is a LLaVA model dir")
        model = load_llava_tower(model_dir)
        vc, params, recall = model.config, {"vision": sum(p.numel() for p in model.parameters())}, None
    else:
        model, tokenizer = load_encoder(model_dir, cfg.random_init)
        vc, params = model.config.vision_config, count_params(model)
        max_len = model.config.text_config.max_position_embeddings
        val = load_world(cfg.world, tokenizer, vc.image_size, max_len, cfg.val_images, cfg.threads)
        recall = retrieval(model, val, cfg.batch_size)
    report: dict[str, Any] = {
        "model": str(model_dir), "world": str(cfg.world), "random_init": cfg.random_init,
        "image_size": vc.image_size, "patch_size": vc.patch_size, "image_tokens": (vc.image_size // vc.patch_size) ** 2,
        "params": params, "retrieval": recall, "probes": None,
    }  # fmt: skip
    if cfg.probe_fit_images:
        report["probes"] = probes(model, cfg, vc.image_size, say)
    report["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return report
