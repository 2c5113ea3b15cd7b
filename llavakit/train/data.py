"""Training data: an index pass, lazy samples rendered and decoded in workers, grouped batches.

1. `build_index` renders every record once (the one render function, in DataLoader workers) to
   learn its exact length and check it — bad `<image>` counts, over-long records, missing image
   files or ones whose header is not an image's. Nothing but the lengths (and which records
   `data.truncate` cut) is kept; samples are rendered again, lazily, when batched.
2. `plan_epoch` shuffles (seeded by epoch) and groups records of one modality and similar length
   into global batches; `rank_micro_batches` cuts each global batch into the micro-batches of one
   process. The plan is a pure function of (seed, epoch), so a resumed run skips to the same place.
3. `LazyDataset` renders a record and decodes its images (or reads cached features) in a worker;
   a bad record comes back as a `Failure` (never an exception in a worker), and the training loop
   stops naming it or counts it, as configured.
4. `collate` right-pads ids with pad_token_id, labels with -100, and stacks images in order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llavakit.data.render import IGNORE_INDEX, RenderOptions


@dataclass(frozen=True)
class Failure:
    """A record that could not be used, and why."""

    id: str
    reason: str
    unexpected: bool = False
    """Not a bad record the checks know (an exception of another kind): stops the run even under `skip`."""


@dataclass
class Index:
    """What the index pass learned: usable record positions with exact lengths, and the bad ones."""

    positions: list[int]
    """Positions (in the records list) of usable records."""
    lengths: list[int]
    """Exact token count of each usable record (image tokens included)."""
    n_images: list[int]
    failures: list[Failure] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    """Positions of usable records that were cut at max_length (data.truncate)."""

    def __len__(self) -> int:
        return len(self.positions)


@dataclass
class Source:
    """Everything a worker needs to turn record `i` into a sample."""

    records: list[dict]
    tokenizer: object
    template: object
    options: RenderOptions
    image_folder: Path
    image_processor: object = None
    features: object = None
    """A `FeatureStore` (cached vision features) instead of decoding images."""


# ---- index pass ---------------------------------------------------------------------------------


class _IndexItems(torch.utils.data.Dataset):
    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.records)

    def __getitem__(self, i: int):
        return i, check_record(self.source, i)


def record_id(record: object, position: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if rid is not None else f"#{position}"


def unexpected(record: object, position: int, exc: Exception) -> Failure:
    return Failure(record_id(record, position), f"{type(exc).__name__}: {exc}", unexpected=True)


def check_record(source: Source, i: int) -> tuple[int, int, bool] | Failure:
    """(length, n_images, truncated) of record i, or why it is unusable (image files: their headers only)."""
    from llavakit.data.images import ImageError, check_image_file
    from llavakit.data.records import RecordError
    from llavakit.data.render import render_record

    record = source.records[i]
    try:
        sample = render_record(record, source.tokenizer, source.template, source.options)
    except RecordError as exc:
        return Failure(record_id(record, i), exc.reason)
    except Exception as exc:  # noqa: BLE001 - in a worker: reported naming the record, never a bare traceback
        return unexpected(record, i, exc)
    for name in sample.images:
        try:
            check_image_file(source.image_folder / name)  # the header: a broken file stops the run now, not hours in
        except ImageError as exc:
            return Failure(sample.id, str(exc))
    return len(sample.input_ids), len(sample.images), sample.truncated


def build_index(source: Source, num_workers: int) -> Index:
    """Render every record once (in workers) for exact lengths and early errors."""
    loader = torch.utils.data.DataLoader(
        _IndexItems(source), batch_size=256, num_workers=num_workers, collate_fn=list,
        generator=torch.Generator(),  # workers' seeds must not consume the global RNG
    )
    index = Index([], [], [])
    for chunk in loader:
        for i, result in chunk:
            if isinstance(result, Failure):
                index.failures.append(result)
                continue
            index.positions.append(i)
            index.lengths.append(result[0])
            index.n_images.append(result[1])
            if result[2]:
                index.truncated.append(i)
    return index


def split_eval(index: Index, eval_size: int, seed: int) -> tuple[Index, Index]:
    """Hold out `eval_size` usable records (seeded) as the eval split."""
    if eval_size >= len(index):
        raise ValueError(f"data.eval_size {eval_size} leaves no training records ({len(index)} usable)")
    order = list(range(len(index)))
    random.Random(seed).shuffle(order)
    held = sorted(order[:eval_size])
    kept = sorted(order[eval_size:])
    return _subset(index, kept, index.failures), _subset(index, held, [])


def _subset(index: Index, keep: list[int], failures: list[Failure]) -> Index:
    positions = [index.positions[k] for k in keep]
    kept = set(positions)
    return Index(positions, [index.lengths[k] for k in keep], [index.n_images[k] for k in keep], list(failures),
                 [p for p in index.truncated if p in kept])


def truncated_ids(source: Source, index: Index) -> list[str]:
    """Ids of the records of `index` that were cut at max_length, in file order."""
    return [record_id(source.records[p], p) for p in index.truncated]


# ---- batching plan ----------------------------------------------------------------------------


def plan_epoch(index: Index, batch_size: int, seed: int, epoch: int, group_by_length: bool, window: int) -> list[list[int]]:
    """The global batches of one epoch, as index entries (0..len-1); the incomplete remainder is dropped.

    Grouped: each modality is shuffled, cut into windows of `window` global batches, each window
    sorted by length and cut into batches; the leftovers of both modalities form mixed batches;
    then the batch order is shuffled. Ungrouped: a plain shuffle.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    entries = list(range(len(index)))
    if not group_by_length:
        rng.shuffle(entries)
        return [entries[s:s + batch_size] for s in range(0, len(entries) - batch_size + 1, batch_size)]
    batches, leftovers = [], []
    for pool in ([e for e in entries if index.n_images[e]], [e for e in entries if not index.n_images[e]]):
        rng.shuffle(pool)
        step = batch_size * window
        for start in range(0, len(pool), step):
            chunk = sorted(pool[start:start + step], key=lambda e: index.lengths[e], reverse=True)
            full = len(chunk) // batch_size * batch_size
            batches += [chunk[s:s + batch_size] for s in range(0, full, batch_size)]
            leftovers += chunk[full:]
    leftovers.sort(key=lambda e: index.lengths[e], reverse=True)
    batches += [leftovers[s:s + batch_size] for s in range(0, len(leftovers) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def rank_micro_batches(batch: list[int], index: Index, micro: int, world: int, rank: int) -> list[list[int]]:
    """This process's micro-batches of one global batch: sorted by length, micro-batch j to rank j % world."""
    ordered = sorted(batch, key=lambda e: (-index.lengths[e], e))
    chunks = [ordered[s:s + micro] for s in range(0, len(ordered), micro)]
    return [[index.positions[e] for e in c] for j, c in enumerate(chunks) if j % world == rank]


def eval_micro_batches(index: Index, micro: int, world: int, rank: int) -> list[list[int]]:
    """Eval batches (length-sorted, deterministic), batch j to rank j % world."""
    ordered = sorted(range(len(index)), key=lambda e: (-index.lengths[e], e))
    chunks = [ordered[s:s + micro] for s in range(0, len(ordered), micro)]
    return [[index.positions[e] for e in c] for j, c in enumerate(chunks) if j % world == rank]


# ---- samples ----------------------------------------------------------------------------------


@dataclass
class Sample:
    id: str
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None  # [n_images, 3, H, W]
    features: torch.Tensor | None  # [n_images, S, Dv]


class LazyDataset(torch.utils.data.Dataset):
    """Record i -> `Sample` (rendered, images decoded or features read) or `Failure`; runs in workers."""

    def __init__(self, source: Source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.records)

    def __getitem__(self, i: int) -> Sample | Failure:
        from llavakit.data.images import ImageError
        from llavakit.data.records import RecordError
        from llavakit.data.render import render_record

        record, src = self.source.records[i], self.source
        try:
            s = render_record(record, src.tokenizer, src.template, src.options)
            pixels = features = None
            if s.images and src.features is not None:
                features = src.features.read(s.images)  # [n, S, Dv]
            elif s.images:
                pixels = self._pixels(s.images)  # [n, 3, H, W]
        except RecordError as exc:
            return Failure(record_id(record, i), exc.reason)
        except ImageError as exc:
            return Failure(record_id(record, i), str(exc))
        except Exception as exc:  # noqa: BLE001 - in a worker: reported naming the record, never a bare traceback
            return unexpected(record, i, exc)
        return Sample(s.id, s.input_ids, s.labels, pixels, features)

    def _pixels(self, names: list[str]) -> torch.Tensor:
        from llavakit.data.images import load_image

        images = [load_image(self.source.image_folder / n) for n in names]
        return self.source.image_processor(images, return_tensors="pt")["pixel_values"]


@dataclass
class Batch:
    """A padded micro-batch, plus its bookkeeping."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor | None  # [N, 3, H, W], images of the batch in order
    features: torch.Tensor | None  # [N, S, Dv]
    ids: list[str]
    failures: list[Failure]

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    @property
    def n_slots(self) -> int:
        """Token slots including padding."""
        return self.input_ids.numel()

    @property
    def n_targets(self) -> int:
        """Tokens the loss is computed on (labels are shifted by one inside the model)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def model_inputs(self, device) -> dict:
        out = {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device),
               "labels": self.labels.to(device)}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values.to(device)
        if self.features is not None:
            out["image_features"] = self.features.to(device)
        return out


class Collate:
    """Right-pad a list of samples; failures are passed along, never dropped silently."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[Sample | Failure]) -> Batch:
        samples = [s for s in items if isinstance(s, Sample)]
        failures = [s for s in items if isinstance(s, Failure)]
        if not samples:  # every record failed: one pad token, nothing trained, so every process still steps
            samples = [Sample("", [self.pad_token_id], [IGNORE_INDEX], None, None)]
        width = max(len(s.input_ids) for s in samples)
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)  # [B, T]
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(samples), width), dtype=torch.long)  # [B, T]
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            ids[row, :n] = torch.tensor(s.input_ids)
            labels[row, :n] = torch.tensor(s.labels)
            mask[row, :n] = 1
        return Batch(ids, labels, mask, _cat([s.pixel_values for s in samples]), _cat([s.features for s in samples]),
                     [s.id for s in samples if s.id], failures)


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    parts = [p for p in parts if p is not None]
    return torch.cat(parts) if parts else None


def make_loader(source: Source, micro_batches: list[list[int]], num_workers: int, pad_token_id: int):
    """A DataLoader over fixed micro-batches (the plan decides order; the loader only fetches)."""
    return torch.utils.data.DataLoader(
        LazyDataset(source), batch_sampler=micro_batches, num_workers=num_workers,
        collate_fn=Collate(pad_token_id), persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
        generator=torch.Generator(),  # workers' seeds must not consume the global RNG (exact resume)
    )
