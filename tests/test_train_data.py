"""The batch plan, per-process micro-batches and the collate (no model needed)."""

from __future__ import annotations

import random

import torch

from llavakit.train.data import Collate, Failure, Index, Sample, plan_epoch, rank_micro_batches


def make_index(n: int, seed: int = 0, text_share: float = 0.3) -> Index:
    rng = random.Random(seed)
    n_images = [0 if rng.random() < text_share else 1 for _ in range(n)]
    lengths = [rng.randint(5, 300) for _ in range(n)]
    return Index(list(range(100, 100 + n)), lengths, n_images)


def test_plan_is_deterministic_complete_and_drops_only_the_remainder():
    index = make_index(103)
    plan = plan_epoch(index, 8, seed=1, epoch=0, group_by_length=True, window=4)
    assert plan == plan_epoch(index, 8, seed=1, epoch=0, group_by_length=True, window=4)
    assert plan != plan_epoch(index, 8, seed=1, epoch=1, group_by_length=True, window=4)
    flat = [e for b in plan for e in b]
    assert len(plan) == 103 // 8 and all(len(b) == 8 for b in plan) and len(set(flat)) == len(flat) == 96


def test_grouping_separates_modalities_and_cuts_padding():
    index = make_index(400)
    grouped = plan_epoch(index, 8, seed=0, epoch=0, group_by_length=True, window=8)
    plain = plan_epoch(index, 8, seed=0, epoch=0, group_by_length=False, window=8)
    mixed = [b for b in grouped if len({bool(index.n_images[e]) for e in b}) > 1]
    assert len(mixed) <= 1  # only the batch made of both modalities' leftovers

    def padding(plan):
        slots = sum(max(index.lengths[e] for e in b) * len(b) for b in plan)
        return 1 - sum(index.lengths[e] for b in plan for e in b) / slots

    assert padding(grouped) < padding(plain) / 3


def test_micro_batches_partition_a_global_batch_over_processes():
    index = make_index(64)
    batch = plan_epoch(index, 16, seed=0, epoch=0, group_by_length=True, window=2)[0]
    one = rank_micro_batches(batch, index, 4, world=1, rank=0)
    two = [rank_micro_batches(batch, index, 2, world=2, rank=r) for r in (0, 1)]
    assert sorted(p for mb in one for p in mb) == sorted(index.positions[e] for e in batch)
    assert sorted(p for r in two for mb in r for p in mb) == sorted(p for mb in one for p in mb)
    assert all(len(mb) == 2 for r in two for mb in r) and len(two[0]) == len(two[1]) == 4


def test_collate_right_pads_and_keeps_images_in_order():
    px = [torch.full((1, 3, 4, 4), float(i)) for i in range(3)]  # [1, 3, H, W] each
    samples = [Sample("a", [5, 6, 7], [-100, 6, 7], px[0], None), Failure("bad", "image file not found"),
               Sample("b", [8], [8], None, None), Sample("c", [9, 9], [-100, 9], torch.cat(px[1:]), None)]
    batch = Collate(pad_token_id=0)(samples)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100], [-100, 9, -100]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch.failures == [Failure("bad", "image file not found")] and batch.ids == ["a", "b", "c"]
    assert (batch.n_tokens, batch.n_slots, batch.n_targets) == (6, 9, 3)


def test_collate_of_only_failures_still_makes_a_batch():
    batch = Collate(pad_token_id=3)([Failure("x", "corrupt")])
    assert batch.input_ids.tolist() == [[3]] and batch.n_targets == 0 and batch.failures[0].id == "x"
