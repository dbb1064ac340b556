"""RunConfig validation: every key checked, errors name the key and suggest a fix."""

import pytest

from peftlab.config import ConfigError, apply_override, from_dict, load_config

BASE = {"model": "tiny", "data": {"train": "x.jsonl"}}


def test_defaults_and_method_options():
    cfg = from_dict({**BASE, "method": {"name": "lora", "r": 4, "alpha": 8}})
    assert cfg.task == "sft" and cfg.method_name == "lora"
    assert cfg.method.r == 4 and cfg.method.alpha == 8.0
    assert cfg.train.precision == "auto" and cfg.train.batch_size == 8


def test_method_name_alone_is_valid():
    cfg = from_dict({**BASE, "method": "lora"})
    assert cfg.method.r == 8


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({**BASE, "trian": {}}, "'trian' (did you mean 'train'?)"),
        ({**BASE, "train": {"lerning_rate": 1}}, "train: unknown key 'lerning_rate'"),
        ({**BASE, "train": {"batchsize": 2}}, "did you mean 'batch_size'"),
        ({**BASE, "method": {"name": "lora", "rank": 4}}, "method: unknown key 'rank'"),
        ({**BASE, "method": {"name": "lorra"}}, "did you mean 'lora'"),
        ({**BASE, "train": {"precision": "fp16"}}, "train.precision"),
        ({**BASE, "train": {"batch_size": "eight"}}, "train.batch_size: expected an integer"),
        ({**BASE, "train": {"batch_size": 0}}, "train.batch_size must be >= 1"),
        ({**BASE, "data": {"train": "x", "format": "alpca"}}, "did you mean 'alpaca'"),
        ({"task": "sft"}, "'model' is required"),
        ({**BASE, "task": "sftt"}, "did you mean 'sft'"),
    ],
)
def test_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    assert needle in str(err.value)


def test_yaml_string_numbers_are_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\ntrain:\n  lr: 2e-4\n  epochs: 2\n")
    cfg = load_config(path)
    assert cfg.train.lr == pytest.approx(2e-4) and cfg.train.epochs == 2.0


def test_overrides_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nmethod: lora\n")
    cfg = load_config(path, ["train.lr=0.01", "method.r=2", "output_dir=out"])
    assert cfg.train.lr == 0.01 and cfg.method.r == 2 and cfg.output_dir == "out"
    cfg.save(tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "train.lr")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
