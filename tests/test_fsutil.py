"""llavakit/fsutil.py: replacing a directory never leaves it without a complete copy on disk."""

from __future__ import annotations

import os

import pytest

from llavakit.fsutil import aside, restore_dir, swap_dir


def make(path, text):
    path.mkdir()
    (path / "f").write_text(text)
    return path


def test_swap_replaces_and_leaves_nothing_beside(tmp_path):
    out = make(tmp_path / "out", "old")
    swap_dir(make(tmp_path / "new", "new"), out)
    assert (out / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    swap_dir(make(tmp_path / "first", "first"), tmp_path / "fresh")  # nothing there yet
    assert (tmp_path / "fresh" / "f").read_text() == "first"


def test_a_kill_between_the_renames_is_repaired_by_the_next_swap(tmp_path):
    out = tmp_path / "out"
    make(aside(out), "old")  # what a kill after the first rename leaves: the old copy aside, `out` missing
    restore_dir(out)
    assert (out / "f").read_text() == "old" and not aside(out).exists()
    make(aside(out), "stale")  # killed after the second rename: the new copy in place, the old one not yet deleted
    swap_dir(make(tmp_path / "new", "new"), out)
    assert (out / "f").read_text() == "new" and not aside(out).exists()


def test_a_failed_move_in_puts_the_old_copy_back(tmp_path, monkeypatch):
    out = make(tmp_path / "out", "old")
    new = make(tmp_path / "new", "new")
    real = os.replace

    def fail_moving_in(src, dst):
        if src == new:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_moving_in)
    with pytest.raises(OSError, match="disk full"):
        swap_dir(new, out)
    assert (out / "f").read_text() == "old" and not aside(out).exists() and (new / "f").read_text() == "new"
