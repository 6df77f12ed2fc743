"""Config parsing: YAML + dotted overrides, unknown keys and wrong types named, help lists every key."""

import dataclasses

import pytest

from posttrain.cli import main, parse_args
from posttrain.config import COMMANDS, ConfigError, DPOConfig, PPOConfig, SFTConfig, help_text, load_config, save_config


def test_overrides_win_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 0.001\ndata:\n  train: a.jsonl\nlora.r: 4\n")
    cfg = load_config(SFTConfig, f, ["learning_rate=3e-4", "data.eval=[b.jsonl, c.jsonl]"])
    assert cfg.learning_rate == 3e-4
    assert cfg.data.train == ["a.jsonl"]  # a scalar becomes a one-item list
    assert cfg.data.eval == ["b.jsonl", "c.jsonl"]
    assert cfg.lora.r == 4


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"`lerning_rate`.*`learning_rate`"):
        load_config(SFTConfig, None, ["lerning_rate=1"])
    with pytest.raises(ConfigError, match=r"`rollout.max_new_token`.*`rollout.max_new_tokens`"):
        load_config(PPOConfig, None, ["rollout.max_new_token=3"])
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  trian: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*`data.trian`.*`data.train`"):
        load_config(SFTConfig, f)


@pytest.mark.parametrize(
    "override, key",
    [("batch_size=abc", "batch_size"), ("batch_size=1.5", "batch_size"), ("packing=maybe", "packing"),
     ("beta=[1]", "beta"), ("data=3", "data")],
)
def test_wrong_type_names_the_key(override, key):
    cls = DPOConfig if override.startswith("beta") else SFTConfig
    with pytest.raises(ConfigError, match=f"`{key}`"):
        load_config(cls, None, [override])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(PPOConfig, None, ["rollout.temperature=0.7", "ref_ema=0.001"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(PPOConfig, tmp_path / "config.yaml")
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_help_lists_every_key_with_help():
    for cls in COMMANDS.values():
        text = help_text(cls)
        for f in dataclasses.fields(cls):
            assert f"{f.name}:" in text or f"[{f.name}]" in text
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_cli_positionals_and_flags():
    path, ov, nproc = parse_args("task", ["arithmetic", "out/dir", "seed=3"])
    assert path is None and nproc == 0
    assert sorted(ov) == ["name=arithmetic", "output_dir=out/dir", "seed=3"]
    path, ov, nproc = parse_args("demo", ["--quick", "--task", "sentiment", "--nproc", "2"])
    assert ov == ["quick=true", "task=sentiment"] and nproc == 2
    _, ov, _ = parse_args("report", ["runs/a", "runs/b"])
    assert load_config(COMMANDS["report"], None, ov).runs == ["runs/a", "runs/b"]


def test_cli_reports_config_errors(capsys):
    assert main(["sft", "lerning_rate=1"]) == 2
    assert "did you mean `learning_rate`" in capsys.readouterr().err
    assert main(["sft", "--help"]) == 0
    assert "loss_on" in capsys.readouterr().out
    assert main(["nope"]) == 2


def test_prompts_with_equals_signs_stay_positional():
    _, ov, _ = parse_args("generate", ["m", "What is 1+2=?", "rollout.temperature=0"])
    cfg = load_config(COMMANDS["generate"], None, ov)
    assert cfg.prompt == ["What is 1+2=?"] and cfg.rollout.temperature == 0


def test_generate_takes_the_model_then_prompts():
    _, ov, _ = parse_args("generate", ["runs/sft/final", "What is 1+2=?", "Hi"])
    cfg = load_config(COMMANDS["generate"], None, ov)
    assert cfg.model == "runs/sft/final" and cfg.prompt == ["What is 1+2=?", "Hi"]


def test_a_missing_model_folder_is_a_clear_error(capsys):
    assert main(["generate", "runs/no/such/model", "hi"]) == 2
    assert "no such folder" in capsys.readouterr().err
