"""Distributed: 2 CPU processes (gloo, torchrun) match 1 process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llavakit.model.io import load_model
from llavakit.train.config import TrainConfig
from llavakit.train.synthetic import write_dataset
from llavakit.train.trainer import train

REPO = Path(__file__).resolve().parent.parent


def stage_config(init, out, data, images, micro: int) -> dict:
    return {
        "stage": "instruct", "init_from": str(init), "out": str(out),
        "data": {"path": str(data), "image_folder": str(images), "num_workers": 0, "eval_size": 6},
        "optim": {"batch_size": 8, "micro_batch_size": micro, "epochs": 2, "lr": 2e-3},
        "checkpoint": {"every_steps": 3, "keep_last": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    }


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "configs/accelerate/cpu_2proc.yaml")],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_match_one(tiny_model_dir, tmp_path, launcher):
    """Same global batch of 8: 1 process x micro 4 x 2 accumulation steps == 2 processes (DDP, gloo)
    x micro 2 x 2 accumulation steps. Batches mix records with and without images."""
    data, images = write_dataset(tmp_path / "data", 30, "qa", text_only=6, multi_image=4)
    one = train(TrainConfig.from_dict(stage_config(tiny_model_dir, tmp_path / "one", data, images, micro=4)))
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(stage_config(tiny_model_dir, tmp_path / "two", data, images, micro=2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([*LAUNCHERS[launcher], "-m", "llavakit.cli", "train", str(cfg)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1
    a = json.loads((one / "report.json").read_text())
    b = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (a["processes"], a["accumulation_steps"], b["processes"], b["accumulation_steps"]) == (1, 2, 2, 2)
    assert a["steps"] == b["steps"] == 8 and a["tokens"] == b["tokens"]
    assert b["final_loss"] == pytest.approx(a["final_loss"], abs=1e-5)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
              for d in (one, tmp_path / "two")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    wa, wb = (load_model(d / "model").model.state_dict() for d in (one, tmp_path / "two"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-6"]
    assert torch.equal(wa["model.vision_tower.embeddings.patch_embedding.weight"],
                       wb["model.vision_tower.embeddings.patch_embedding.weight"])
