"""Replacing a directory without a moment where no complete copy of it is on disk.

Linux can swap two directories atomically (renameat2 with RENAME_EXCHANGE), but Python's standard library
does not expose it, so this is the two-rename version, written once for every writer that replaces a dir
(models, LoRA adapters, feature caches): the old copy is renamed aside under a fixed name, the new one
renamed in, the old one deleted. A process killed between the two renames leaves the old copy under that
fixed name, and the next `swap_dir` (or `restore_dir`) on the same path puts it back first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def aside(out: Path) -> Path:
    """Where `swap_dir` keeps the old copy of `out` while the new one moves in."""
    return out.with_name(f".{out.name}.old")


def restore_dir(out: Path) -> None:
    """Finish what a killed `swap_dir` left: the old copy back at `out` if `out` is missing, else deleted."""
    old = aside(out)
    if old.is_dir():
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out)


def swap_dir(tmp: Path, out: Path) -> None:
    """Put the complete directory `tmp` at `out`, replacing whatever dir is there."""
    out, tmp = Path(out), Path(tmp)
    restore_dir(out)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = aside(out)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)  # the old copy back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)  # the new copy is in place: a failed delete is no failed save
