import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pixelbert_dist import config as config_module
from pixelbert_dist.config import ConfigError, FinetuneConfig, PretrainConfig, field_docs, load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_ships_the_three_pretrain_configs():
    names = {p.name for p in SHIPPED}
    assert {"tiny-cpu.yaml", "r50-coco-vg.yaml", "x152-coco-vg.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_points_at_real_files(path):
    cfg = load_config(path, schema=FinetuneConfig if path.parent.name == "finetune" else PretrainConfig)
    deepspeed_json = REPO / cfg.deepspeed.config
    assert deepspeed_json.is_file(), f"{path} names a missing DeepSpeed config {deepspeed_json}"
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_paper_settings_in_r50_config():
    cfg = load_config(REPO / "configs/pretrain/r50-coco-vg.yaml")
    assert (cfg.model.backbone, cfg.model.hidden_size, cfg.model.num_layers) == ("resnet50", 768, 12)
    assert cfg.model.pixel_sample_count == 100
    assert (cfg.data.image_short_side, cfg.data.image_long_side) == (800, 1333)
    assert (cfg.optim.cnn_lr, cfg.optim.cnn_momentum, cfg.optim.cnn_weight_decay) == (1e-2, 0.9, 5e-4)
    assert (cfg.optim.transformer_lr, cfg.optim.transformer_weight_decay) == (1e-4, 1e-2)
    assert cfg.optim.lr_decay_epochs == [25, 35] and cfg.train.epochs == 40


def test_overrides_win_over_the_file_and_are_typed():
    cfg = load_config(REPO / "configs/pretrain/tiny-cpu.yaml",
                      ["--model.num_layers=4", "--optim.cnn_lr=1", "--model.backbone_widths=[8,8,16,16]",
                       "--tracking.run_name=abc", "--optim.transformer_lr=3e-4"])
    assert cfg.model.num_layers == 4
    assert cfg.optim.cnn_lr == 1.0 and isinstance(cfg.optim.cnn_lr, float)
    assert cfg.optim.transformer_lr == 3e-4  # YAML reads "3e-4" as a string; a float field takes it
    assert cfg.model.backbone_widths == [8, 8, 16, 16]
    assert cfg.tracking.run_name == "abc"
    assert cfg.model.hidden_size == 64  # untouched keys keep the file's value


def test_unknown_key_names_itself_and_the_closest_valid_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.hiden_size" in str(err.value) and "model.hidden_size" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_section_and_override_are_named():
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'.*'optim'"):
        load_config(None, ["--optimizer.cnn_lr=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch'.*'train.epochs'"):
        load_config(None, ["--train.epoch=3"])


@pytest.mark.parametrize("override, expected", [
    ("--model.hidden_size=abc", r"model.hidden_size: expected int, got str 'abc'"),
    ("--model.hidden_size=64.5", r"model.hidden_size: expected int, got float"),
    ("--model.train_backbone_norm=1", r"model.train_backbone_norm: expected bool, got int"),
    ("--model.num_layers=true", r"model.num_layers: expected int, got bool"),
    ("--model.backbone_widths=[8,x,8,8]", r"model.backbone_widths\[1\]: expected int"),
    ("--optim.lr_decay_epochs=25", r"optim.lr_decay_epochs: expected list\[int\], got int"),
])
def test_wrong_type_names_field_and_expected_type(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


@pytest.mark.parametrize("override, expected", [
    ("--model.backbone=resnet18", r"model.backbone: invalid value 'resnet18'; choose one of 'resnet50'"),
    ("--train.precision=fp8", r"train.precision: invalid value 'fp8'"),
    ("--model.hidden_size=100", r"model.hidden_size \(100\) must be a positive multiple of model.num_heads"),
    ("--train.micro_batch_size=7", r"train.global_batch_size \(4096\) must be a positive multiple"),
    ("--deepspeed.zero_stage=4", r"deepspeed.zero_stage must be 0-3"),
    ("--data.mlm_probability=1.5", r"data.mlm_probability must be in \(0, 1\)"),
])
def test_invalid_value_says_the_rule(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, ["--model.hidden_size"])
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_to_dict_round_trips_through_yaml(tmp_path):
    cfg = load_config(REPO / "configs/pretrain/tiny-cpu.yaml", ["--model.num_layers=3"])
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(path) == cfg
    flat = cfg.flat_dict()
    assert flat["model.num_layers"] == 3 and len(flat) == sum(len(v) for v in cfg.to_dict().values())


def test_every_field_has_one_docstring_line_and_help_lists_it(capsys):
    for section in dataclasses.fields(PretrainConfig):
        cls = typing.get_type_hints(PretrainConfig)[section.name]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section.name}.{f.name} has no docstring line"
            assert "\n" not in docs[f.name]
    config_module.main(["--help"])
    out = capsys.readouterr().out
    assert "--model.pixel_sample_count=100" in out and "random pixel sampling" in out


def test_cli_prints_the_resolved_config_and_exits_2_on_errors(capsys):
    assert config_module.main([str(REPO / "configs/pretrain/tiny-cpu.yaml"), "--model.num_layers=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["num_layers"] == 3
    assert config_module.main(["--model.hiden_size=3"]) == 2
    assert "did you mean 'model.hidden_size'" in capsys.readouterr().err


def test_a_shipped_config_works_from_any_folder(tmp_path, monkeypatch):
    # the DeepSpeed JSON a config file names is found beside that file, not in the working folder
    monkeypatch.chdir(tmp_path)
    for path in sorted((REPO / "configs").glob("*/*.yaml")):
        schema = FinetuneConfig if path.parent.name == "finetune" else PretrainConfig
        cfg = load_config(path.resolve(), ["--model.vocab_size=100"] if "tiny" in path.name else [], schema=schema)
        assert Path(cfg.deepspeed.config).is_file(), (path, cfg.deepspeed.config)
    # on the command line, a relative path is the user's: relative to where the job runs
    assert load_config(REPO / "configs/pretrain/r50-coco-vg.yaml", ["--deepspeed.config=my.json"]).deepspeed.config \
        == "my.json"
