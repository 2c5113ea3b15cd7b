"""The training config: typed YAML, overrides, unknown keys, stage defaults, validation."""

from __future__ import annotations

import pytest
import yaml

from llavakit.train.config import ConfigError, TrainConfig, apply_override, load_config

BASE = {"stage": "align", "init_from": "m", "data": {"path": "d.json"}}


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
