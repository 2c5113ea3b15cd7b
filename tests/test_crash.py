"""Crash tests: SIGKILL in the middle of a checkpoint write and in the middle of datagen.

A child process runs the real command with one hook installed that, at a chosen point inside a
write, leaves the file as a killed process would (a prefix of it) and SIGKILLs itself. Then the
run is resumed. It must read no corrupt file, and end equal to a run that was never interrupted:
same weights, losses and metrics for training; byte-identical output, every record exactly once,
for datagen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
WORLD = Path(__file__).parent / "fixtures" / "datagen" / "world"

# Installed in the child before the command runs. KILL names the point, STEP the checkpoint.
CHILD = r'''
import os, shutil, signal, sys
from pathlib import Path

KILL, STEP = sys.argv[1], sys.argv[2]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def cut(path):
    """Leave `path` as a write killed half-way through would: its first half."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    die()


if KILL in ("weights", "optimizer"):
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def hooked(self, output_dir=None, **kw):
        out = save_state(self, output_dir, **kw)
        if Path(output_dir).name == f".tmp-step-{STEP}":
            cut(Path(output_dir) / ("model.safetensors" if KILL == "weights" else "optimizer.bin"))
        return out

    Accelerator.save_state = hooked
elif KILL == "state-file":
    from llavakit.train import checkpoint

    import json

    write_json = checkpoint._write_json

    def hooked(path, data):
        if path.parent.name == f".tmp-step-{STEP}":
            path.with_suffix(".part").write_text(json.dumps(data)[:40])
            die()
        write_json(path, data)

    checkpoint._write_json = hooked
elif KILL == "before-rename":
    from llavakit.train import checkpoint

    replace_dir = checkpoint._replace_dir

    def hooked(src, dst):
        if dst.name == f"step-{STEP}":
            die()
        replace_dir(src, dst)

    checkpoint._replace_dir = hooked
elif KILL == "pruning":  # STEP: the old checkpoint being deleted
    rmtree = shutil.rmtree

    def hooked(path, *a, **kw):
        p = Path(path)
        if p.name in (f"step-{STEP}", f".old-step-{STEP}") and p.is_dir():
            (p / "model.safetensors").unlink()  # rmtree got this far
            die()
        rmtree(path, *a, **kw)

    shutil.rmtree = hooked
elif KILL == "cache-append":  # the STEP-th line appended to the datagen cache is torn
    real_write, count = os.write, [0]

    def hooked(fd, data):
        if "/cache/" in os.readlink(f"/proc/self/fd/{fd}"):
            count[0] += 1
            if count[0] == int(STEP):
                real_write(fd, bytes(data)[: len(data) // 2])
                die()
        return real_write(fd, data)

    os.write = hooked
elif KILL == "output-write":  # the output file is half written when the process dies
    real_fsync = os.fsync

    def hooked(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(".data.json.tmp."):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            die()
        real_fsync(fd)

    os.fsync = hooked

from llavakit.cli import main

sys.exit(main(sys.argv[3:]))
'''


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_child(tmp: Path, kill: str, step: int, args: list[str]) -> subprocess.CompletedProcess:
    script = tmp / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(script), kill, str(step), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


# ---- training ---------------------------------------------------------------------------------


def train_config(model: Path, data: dict, out: Path):
    from llavakit.train.config import TrainConfig

    return TrainConfig.from_dict({
        "stage": "align", "init_from": str(model), "out": str(out),
        "data": {"path": str(data["records"]), "image_folder": str(data["images"]), "num_workers": 0, "eval_size": 4},
        "optim": {"batch_size": 4, "micro_batch_size": 2, "epochs": 1},  # 20 records: 5 steps
        "checkpoint": {"every_steps": 2, "keep_last": 1},
        "log": {"progress": False, "tensorboard": False, "plot": False},
    })


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    from llavakit.train.synthetic import write_dataset

    records, images = write_dataset(tmp_path_factory.mktemp("squares"), 24, "caption")
    return {"records": records, "images": images}


@pytest.fixture(scope="module")
def whole(tiny_model_dir, squares, tmp_path_factory):
    """The uninterrupted run."""
    from llavakit.train.trainer import train

    return train(train_config(tiny_model_dir, squares, tmp_path_factory.mktemp("whole") / "run"))


def check_loadable(ckpt: Path, reference: Path) -> None:
    """A checkpoint that looks complete is complete: every file of a good one, each of them readable."""
    from safetensors.torch import load_file

    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in reference.iterdir())
    load_file(str(ckpt / "model.safetensors"))
    torch.load(ckpt / "optimizer.bin", weights_only=False)
    json.loads((ckpt / "trainer_state.json").read_text())


def model_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def train_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


@pytest.mark.parametrize("kill, step, resumes_from", [
    ("weights", 4, 2),  # model.safetensors half written
    ("optimizer", 4, 2),  # optimizer.bin half written
    ("state-file", 4, 2),  # trainer_state.json half written (it marks a checkpoint complete)
    ("before-rename", 4, 2),  # everything written, not yet renamed into place
    ("pruning", 2, 4),  # the new checkpoint in place, the old one half deleted
])
def test_killed_during_a_checkpoint_write_resumes_to_the_same_model(tiny_model_dir, squares, whole, tmp_path,
                                                                    kill, step, resumes_from):
    from llavakit.train import checkpoint as ckpt
    from llavakit.train.trainer import train

    cfg = train_config(tiny_model_dir, squares, tmp_path / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    killed = run_child(tmp_path, kill, step, ["train", str(tmp_path / "c.yaml")])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    reference = ckpt.latest(whole / "checkpoints")
    found = ckpt.checkpoints(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in found][-1] == resumes_from
    for _, path in found:
        check_loadable(path, reference)
    resumed = train(cfg, resume=True)
    a, b = (json.loads((r / "report.json").read_text()) for r in (whole, resumed))
    assert b["resumed_from_step"] == resumes_from and a["steps"] == b["steps"] == 5
    assert b["final_loss"] == pytest.approx(a["final_loss"], abs=1e-6)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-6)
    wa, wb = model_tensors(whole), model_tensors(resumed)
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    assert train_steps(resumed) == [1, 2, 3, 4, 5]  # every step logged once, none lost or repeated
    assert [s for s, _ in ckpt.checkpoints(resumed / "checkpoints")] == [4]


def test_checkpoint_files_are_fsynced_before_the_state_file_marks_them_complete(tmp_path, monkeypatch):
    """Against a power cut: a renamed checkpoint must not hold files still only in the page cache."""
    from llavakit.train import checkpoint as ckpt

    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    write_json = ckpt._write_json
    monkeypatch.setattr(ckpt, "_write_json", lambda path, data: (events.append(("state", str(path))),
                                                                 write_json(path, data)))

    class Accelerator:  # one process; save_state writes two files as accelerate would
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, out):
            Path(out).mkdir()
            (Path(out) / "model.safetensors").write_bytes(b"w" * 100)
            (Path(out) / "optimizer.bin").write_bytes(b"o" * 100)

    final = ckpt.save(Accelerator(), tmp_path, 3, {"step": 3}, "stage: align\n", keep_last=1)
    state_written = events.index(("state", str(tmp_path / ".tmp-step-3" / ckpt.STATE_FILE)))
    synced = [p for kind, p in events[:state_written] if kind == "fsync"]
    tmp = tmp_path.resolve() / ".tmp-step-3"
    assert {str(tmp / n) for n in ("model.safetensors", "optimizer.bin", "config.yaml")} | {str(tmp)} <= set(synced)
    assert events[-1] == ("fsync", str(tmp_path.resolve()))  # the rename itself is made durable
    assert ckpt.latest(tmp_path) == final


# ---- datagen ----------------------------------------------------------------------------------


def datagen_args(root: Path) -> list[str]:
    return ["datagen", "--annotations", str(WORLD), "--images-dir", str(WORLD / "images"),
            "--cache", str(root / "cache"), "--out", str(root / "data.json"), "--no-progress"]


@pytest.fixture(scope="module")
def datagen_whole(tmp_path_factory) -> Path:
    from llavakit.cli import main

    root = tmp_path_factory.mktemp("datagen_whole")
    assert main(datagen_args(root)) == 0
    return root


def cache_keys(cache: Path) -> list[str]:
    return [json.loads(line)["key"] for f in sorted(cache.glob("*.jsonl")) for line in f.read_text().splitlines()]


@pytest.mark.parametrize("kill, at", [
    ("cache-append", 5),  # the 5th finished item's cache line torn in half
    ("cache-append", 19),
    ("output-write", 0),  # every item cached, the output file half written
])
def test_datagen_killed_mid_write_resumes_to_the_same_output(datagen_whole, tmp_path, capsys, kill, at):
    from llavakit.cli import main

    old = b"[]\n"
    (tmp_path / "data.json").write_bytes(old)  # a previous run's output: must survive the crash intact
    killed = run_child(tmp_path, kill, at, datagen_args(tmp_path))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "data.json").read_bytes() == old
    if kill == "cache-append":
        assert len(cache_keys_complete(tmp_path / "cache")) == at - 1  # what was finished before the kill is kept
    assert main(datagen_args(tmp_path)) == 0
    capsys.readouterr()
    assert (tmp_path / "data.json").read_bytes() == (datagen_whole / "data.json").read_bytes()
    ids = [r["id"] for r in json.loads((tmp_path / "data.json").read_text())]
    keys = cache_keys(tmp_path / "cache")
    assert len(ids) == len(set(ids)) == 21 and len(keys) == len(set(keys)) == 21
    report = json.loads((tmp_path / "data.report.json").read_text())
    assert report["total"]["records"] == 21 and report["cache"]["torn"] == (kill == "cache-append")
    assert report["total"]["cached"] == (at - 1 if kill == "cache-append" else 21)
    assert not list(tmp_path.glob(".data.json.tmp.*"))  # the killed run's temp file is gone


def cache_keys_complete(cache: Path) -> list[str]:
    """Keys of whole lines only (a torn last line is not a record)."""
    keys = []
    for f in cache.glob("*.jsonl"):
        data = f.read_bytes()
        keys += [json.loads(line)["key"] for line in data[: data.rfind(b"\n") + 1].splitlines()]
    return keys
