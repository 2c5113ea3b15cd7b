"""A precomputed, memory-mapped store of vision features (the encoder is frozen in both stages).

What is stored is exactly what the model feeds its projector: the vision tower's selected
features (layer and CLS handling as configured), captured with a forward pre-hook on the
projector while the model's own `get_image_features` runs. Training then projects the cached
features and hands them to the model through its own `mm_encoder_outputs` path, so the scatter
into `<image>` positions and the count check are still transformers' own.

The store is keyed by a hash of the vision tower's config and weights, the image processor's
config and the feature layer/strategy; a store built for another key is refused, never reused.
A store with the right key that lacks some images of the data is extended (old rows copied into
a new store, only the new images encoded), so one cache can serve both stages. Rows are keyed by
image path *and* the sha256 of the file's bytes: an image whose file changed since it was encoded
(e.g. a world regenerated with other settings under the same file names) is encoded again, never
read back with the old picture's features.

Layout: `meta.json` (key, dtype, shape, image list, failed images, file digests), `features.bin`
(a raw [N, S, D] array read with numpy memmap).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from llavakit.fsutil import swap_dir

FORMAT_VERSION = 1


class StaleCacheError(ValueError):
    """The feature cache on disk was built for a different encoder or preprocessing."""


def encoder_key(llava, image_processor) -> str:
    """sha256 over everything that determines a cached feature."""
    config = llava.config
    h = hashlib.sha256()
    # where the tower was loaded from and which library wrote it do not change a feature (a moved encoder dir
    # must not invalidate a cache)
    vision = {k: v for k, v in config.vision_config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(vision, sort_keys=True, default=str).encode())
    h.update(image_processor.to_json_string().encode())
    h.update(json.dumps([config.vision_feature_layer, config.vision_feature_select_strategy, FORMAT_VERSION]).encode())
    for name, tensor in sorted(llava.model.vision_tower.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureStore:
    """Read-only view of a built cache; opens its memmap lazily (after DataLoader workers fork)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.meta = json.loads((self.root / "meta.json").read_text())
        self.rows = {name: i for i, name in enumerate(self.meta["images"])}
        self.failed = dict(self.meta.get("failed", {}))
        self._array = None

    @property
    def key(self) -> str:
        return self.meta["key"]

    def _open(self) -> np.memmap:
        if self._array is None:
            shape = (len(self.meta["images"]), *self.meta["shape"])
            self._array = np.memmap(self.root / "features.bin", dtype=self.meta["dtype"], mode="r", shape=shape)
        return self._array

    def read(self, names: list[str]) -> torch.Tensor:
        """Features of these images, float32 [n, S, D]; `ImageError` naming an image that failed or is absent."""
        from llavakit.data.images import ImageError

        for n in names:
            if n in self.failed:
                raise ImageError(self.failed[n])
            if n not in self.rows:
                raise ImageError(f"{n}: not in the feature cache {self.root}")
        rows = self._open()[[self.rows[n] for n in names]]  # [n, S, D]
        return torch.from_numpy(np.asarray(rows, dtype=np.float32))

    def __getstate__(self):  # never pickle an open memmap into a worker
        return {**self.__dict__, "_array": None}


def open_or_build(root: str | Path, llava, image_processor, images: list[str], image_folder: Path, *,
                  dtype: str, batch_size: int, num_workers: int, is_main: bool, barrier) -> FeatureStore:
    """The store at `root` covering these images: refused if stale; built, or extended with the
    images it lacks (one cache can serve both stages), by the main process."""
    root = Path(root)
    key = encoder_key(llava, image_processor)
    if is_main:
        base = FeatureStore(root) if (root / "meta.json").is_file() else None
        if base is not None:
            check_key(base, key)
        digests = {name: file_digest(image_folder / name) for name in images}
        stored = base.meta.get("digests", {}) if base else {}
        known = set(base.rows) | set(base.failed) if base else set()
        # encoded from another file than the one now at that path: encode again (stores without digests: all)
        changed = {n for n in images if n in known and stored.get(n, "") != digests[n]}
        todo = sorted((set(images) - known) | changed)
        if todo:
            build(root, llava, image_processor, todo, image_folder, key, dtype if base is None else base.meta["dtype"],
                  batch_size, num_workers, base, digests)
    barrier()
    store = FeatureStore(root)
    check_key(store, key)
    return store


def file_digest(path: Path) -> str | None:
    """sha256 of the file's bytes; None if it cannot be read (encoding then records why)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def check_key(store: FeatureStore, key: str) -> None:
    if store.key != key:
        raise StaleCacheError(
            f"feature cache {store.root} is stale: built for encoder {store.key[:12]}, this model's is {key[:12]} "
            "(vision weights, vision config, image processor or feature layer changed); delete it to rebuild")


class _Images(torch.utils.data.Dataset):
    def __init__(self, names: list[str], folder: Path, image_processor):
        self.names, self.folder, self.image_processor = names, folder, image_processor

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        from llavakit.data.images import ImageError, load_image

        try:
            image = load_image(self.folder / self.names[i])
        except ImageError as exc:
            return i, str(exc)
        return i, self.image_processor([image], return_tensors="pt")["pixel_values"][0]  # [3, H, W]


def selected_features(llava, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the model's projector receives for these images: [N, S, Dv]."""
    captured = []
    projector = llava.model.multi_modal_projector
    handle = projector.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            llava.model.get_image_features(pixel_values=pixel_values)
    finally:
        handle.remove()
    return captured[0]


def encode(llava, names: list[str], folder: Path, image_processor, batch_size: int, num_workers: int, failed: dict):
    """Yield (indices into names, features [n, S, Dv]) per batch; unreadable images go to `failed`."""
    loader = torch.utils.data.DataLoader(_Images(names, folder, image_processor), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=list, generator=torch.Generator())
    device = next(llava.model.vision_tower.parameters()).device
    was_training = llava.training
    llava.eval()
    try:
        for chunk in loader:
            failed.update({names[i]: reason for i, reason in chunk if isinstance(reason, str)})
            ok = [(i, px) for i, px in chunk if isinstance(px, torch.Tensor)]
            if ok:
                pixels = torch.stack([px for _, px in ok]).to(device)  # [n, 3, H, W]
                yield [i for i, _ in ok], selected_features(llava, pixels)
    finally:
        llava.train(was_training)


def _new_array(tmp: Path, dtype: str, rows: int, shape: list[int], base: FeatureStore | None,
               old: list[str]) -> np.memmap:
    array = np.memmap(tmp / "features.bin", dtype=dtype, mode="w+", shape=(rows, *shape))  # [N, S, Dv]
    rows_of = [base.rows[n] for n in old] if old else []
    for i in range(0, len(rows_of), 1024):  # in chunks: a cache can be far larger than memory
        chunk = rows_of[i:i + 1024]
        array[i:i + len(chunk)] = base._open()[chunk]  # the kept old rows, unchanged
    return array


def build(root: Path, llava, image_processor, names: list[str], folder: Path, key: str, dtype: str,
          batch_size: int, num_workers: int, base: FeatureStore | None, digests: dict[str, str | None]) -> None:
    """Encode `names` into a new store after the rows of `base` (if any) that are not in `names`
    (those are encoded again); temp dir + rename. `digests`: file sha256 per image, recorded.

    Rows of unreadable images stay zero and are listed in `failed` (never read back as features).
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    again = set(names)
    old = [n for n in base.meta["images"] if n not in again] if base else []
    shape = list(base.meta["shape"]) if base else None
    failed = {n: why for n, why in base.failed.items() if n not in again} if base else {}
    recorded = {n: d for n, d in base.meta.get("digests", {}).items() if n not in again} if base else {}
    recorded.update({n: digests[n] for n in names})
    array = None
    try:
        for rows, feats in encode(llava, names, folder, image_processor, batch_size, num_workers, failed):
            if array is None:
                shape = list(feats.shape[1:])
                array = _new_array(tmp, dtype, len(old) + len(names), shape, base, old)
            array[[len(old) + r for r in rows]] = feats.float().cpu().numpy().astype(dtype)  # [n, S, Dv]
        if shape is None:
            raise ValueError(f"feature cache: none of the {len(names)} images could be read, e.g. {next(iter(failed.values()))}")
        if array is None:  # nothing new could be read: the old rows, and the new failures
            array = _new_array(tmp, dtype, len(old) + len(names), shape, base, old)
        array.flush()
        del array
        meta = {"key": key, "dtype": dtype, "shape": shape, "images": old + names, "failed": failed,
                "digests": recorded, "version": FORMAT_VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta))
        swap_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
