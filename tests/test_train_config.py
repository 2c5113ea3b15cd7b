"""The training config: typed YAML, overrides, unknown keys, stage defaults, validation; the shipped
accelerate / DeepSpeed launcher configs (parsed and validated only: FSDP and DeepSpeed never run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llavakit.train.config import ConfigError, TrainConfig, apply_override, load_config

BASE = {"stage": "align", "init_from": "m", "data": {"path": "d.json"}}
REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = sorted((REPO / "configs" / "deepspeed").glob("*.json"))


def write(tmp_path, data, name="c.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_stage_defaults_follow_llava():
    align = TrainConfig.from_dict(BASE)
    assert align.optim.lr == 1e-3 and align.data.template == "plain" and align.train_lm is False
    instruct = TrainConfig.from_dict({**BASE, "stage": "instruct"})
    assert instruct.optim.lr == 2e-5 and instruct.data.template is None and instruct.train_lm is True
    lora = TrainConfig.from_dict({**BASE, "stage": "instruct", "lora": {"enabled": True}})
    assert lora.optim.lr == 2e-4 and lora.lora.r == 128 and lora.lora.alpha == 256
    assert (instruct.optim.scheduler, instruct.optim.warmup_ratio, instruct.optim.weight_decay) == ("cosine", 0.03, 0.0)


def test_overrides_are_typed_and_nested(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(path, ["optim.lr=1e-4", "data.num_workers=0", "lora.target_modules=[q_proj, v_proj]",
                             "stage=instruct", "data.eval_path=null"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.num_workers == 0 and cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.stage == "instruct"


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("dataa.path=x", "unknown key 'dataa'"),
    ("optim.batch_size=big", "optim.batch_size: expected int, got 'big'"),
    ("data.group_by_length=3", "data.group_by_length: expected bool"),
    ("optim.lr", "expected key.sub=value"),
    ("stage=pretrain", "stage: must be one of"),
    ("data.on_bad_record=ignore", "data.on_bad_record: must be one of"),
    ("optim.batch_size=12", "optim.batch_size: must be a multiple of micro_batch_size 16"),
    ("data.template=vicuna", "data.template: unknown chat template 'vicuna'"),
])
def test_bad_configs_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, BASE), [override])
    assert message in str(exc.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="LoRA is for the instruct stage"):
        TrainConfig.from_dict({**BASE, "lora": {"enabled": True}})
    with pytest.raises(ConfigError, match="data.feature_cache: needs a frozen vision tower"):
        TrainConfig.from_dict({**BASE, "train_vision": True, "data": {"path": "d", "feature_cache": "c"}})
    with pytest.raises(ConfigError, match="missing key 'init_from'"):
        TrainConfig.from_dict({"stage": "align", "data": {"path": "d"}})
    with pytest.raises(ConfigError, match="data.path: is required"):
        TrainConfig.from_dict({**BASE, "data": {}})


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["optim.epochs=3"])
    again = load_config(write(tmp_path, yaml.safe_load(cfg.to_yaml()), "again.yaml"))
    assert again == cfg


def test_override_into_scalar_is_refused():
    data = {"stage": "align"}
    with pytest.raises(ConfigError, match="'stage' is not a section"):
        apply_override(data, "stage.x=1")


def test_launcher_configs_are_shipped():
    assert {p.name for p in ACCELERATE_CONFIGS} >= {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}
    assert {p.name for p in DEEPSPEED_CONFIGS} == {"zero2.json", "zero3.json"}


def launch_options() -> set[str]:
    """Every option `accelerate launch` has (a config file's nested keys must be among them)."""
    from accelerate.commands.launch import launch_command_parser

    return set(vars(launch_command_parser().parse_args(["train.py"])))


def launch_args(path: Path):
    """What `accelerate launch --config_file PATH` makes of the file (accelerate's own loader and checks)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    _validate_launch_command(args)  # private, but it is exactly what `accelerate launch` runs on the file
    return args


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_shipped_accelerate_config_loads(path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    monkeypatch.chdir(REPO)  # the DeepSpeed ones name their JSON relative to the repo, as documented
    cfg = load_config_from_file(str(path))  # unknown top-level keys raise
    args = launch_args(path)
    nested = {**(cfg.fsdp_config or {}), **(cfg.deepspeed_config or {})}
    assert not set(nested) - launch_options(), f"{path.name}: keys accelerate launch does not know"
    assert args.num_processes == cfg.num_processes >= 2
    kind = cfg.distributed_type.value
    if kind == "DEEPSPEED":
        check_deepspeed_launch(path, cfg, args)
    if kind == "FSDP":
        check_fsdp_launch(args, monkeypatch)


def check_deepspeed_launch(path: Path, cfg, args) -> None:
    from accelerate.utils import DeepSpeedPlugin

    json_path = REPO / cfg.deepspeed_config["deepspeed_config_file"]
    assert json_path in DEEPSPEED_CONFIGS and args.use_deepspeed
    stage = DeepSpeedPlugin(hf_ds_config=str(json_path)).zero_stage
    assert path.stem == f"deepspeed_zero{stage}"


def check_fsdp_launch(args, monkeypatch) -> None:
    """The FSDP_* environment `accelerate launch` would set, read back by the plugin the training process builds."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert args.use_fsdp and plugin.fsdp_version == 2 and plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=lambda p: p.name)
def test_shipped_deepspeed_config_is_valid(path, capsys):
    from accelerate.utils import DeepSpeedPlugin

    from llavakit.train.dryrun import Checks, check_deepspeed

    zero = json.loads(path.read_text())["zero_optimization"]
    stage = zero["stage"]
    assert path.stem == f"zero{stage}" and stage in (2, 3)
    stage3_keys = {k for k in zero if k.startswith("stage3_")}
    assert bool(stage3_keys) == (stage == 3), f"{path.name}: stage3_* keys in a stage-{stage} config"
    if stage == 3:  # export gathers the full weights to write model/
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert DeepSpeedPlugin(hf_ds_config=str(path)).zero_stage == stage  # how llavakit's setup reads it
    checks = Checks()  # the dry run's checks: "auto" bucket sizes, optimizer/scheduler sections, conflicts
    check_deepspeed(TrainConfig.from_dict({**BASE, "runtime": {"deepspeed": str(path)}}), checks)
    assert checks.failed == 0, capsys.readouterr().out
