"""Config parsing: YAML + dotted overrides, unknown keys and wrong types named, help lists every key."""

import dataclasses
import functools
import importlib.util
import re
import typing

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


# --------------------------------------------------------------------------- each command takes exactly its keys


@pytest.mark.parametrize("command, override, says", [
    # ppo: its length is total_episodes; mini_batch_size / batch_size set the accumulation; DDP only
    ("ppo", "max_steps=150", "total_episodes"),
    ("ppo", "num_epochs=2", "total_episodes"),
    ("ppo", "grad_accum=4", "mini_batch_size"),
    ("ppo", "strategy=fsdp", "always runs DDP"),
    ("ppo", "data.eval_split=0.1", "data.eval"),
    ("ppo", "logging.eval_steps=5", "eval_every"),
    ("ppo", "rollout.backend=vllm", "eval and generate"),
    # online-dpo: epochs_per_round, a checkpoint per round, its own samples_per_prompt
    ("online-dpo", "num_epochs=2", "epochs_per_round"),
    ("online-dpo", "save.steps=1", "end of every round"),
    ("online-dpo", "logging.eval_steps=5", "after every round"),
    ("online-dpo", "rollout.samples_per_prompt=3", "`samples_per_prompt`"),
    ("online-dpo", "rollout.batch_size=64", "prompts_per_round"),
    ("online-dpo", "strategy=fsdp", "always runs DDP"),
    ("online-dpo", "data.eval_split=0.1", "data.eval"),
    ("eval", "rollout.samples_per_prompt=3", "num_samples"),
    ("eval", "rollout.batch_size=3", "batch_size"),
    ("generate", "rollout.batch_size=3", "generation_batch_size"),
])
def test_a_key_the_command_ignored_is_refused_by_name(capsys, command, override, says):
    """Each of these was accepted and silently did nothing; now the command stops before any work, naming the key
    and the key that does its job."""
    key = override.split("=")[0]
    assert main([command, override]) == 2
    err = capsys.readouterr().err
    assert f"config key `{key}` is not accepted" in err and says in err


def _help_keys(command, capsys) -> list[str]:
    assert main([command, "--help"]) == 0
    return re.findall(r"^  ([\w.]+): ", capsys.readouterr().out, flags=re.M)


def _dotted_keys(cls, prefix="") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        out += _dotted_keys(tp, f"{prefix}{f.name}.") if dataclasses.is_dataclass(tp) else [f"{prefix}{f.name}"]
    return out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_exactly_the_keys_the_command_accepts(command, capsys):
    """--help's keys are the config's keys, once each, and each of them loads (with its own default; a key that only
    applies with some values of another, `ONLY_WITH`, together with the first of them)."""
    listed = _help_keys(command, capsys)
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(_dotted_keys(COMMANDS[command]))
    cfg = COMMANDS[command]()
    only_with = getattr(COMMANDS[command], "ONLY_WITH", {})
    for key in listed:
        value = functools.reduce(getattr, key.split("."), cfg)
        selector = {only_with[key][0]: only_with[key][1][0]} if key in only_with else {}
        load_config(COMMANDS[command], None, {key: value, **selector})


def test_help_of_the_online_commands(capsys):
    ppo = set(_help_keys("ppo", capsys))
    assert not ppo & {"grad_accum", "num_epochs", "max_steps", "strategy", "data.eval_split", "logging.eval_steps",
                      "rollout.backend"}
    assert {"total_episodes", "rollout.batch_size", "data.max_rows", "data.shuffle", "eval_every"} <= ppo
    online = set(_help_keys("online-dpo", capsys))
    assert not online & {"num_epochs", "strategy", "data.eval_split", "logging.eval_steps", "save.steps",
                         "rollout.batch_size", "rollout.samples_per_prompt", "rollout.backend"}
    assert {"epochs_per_round", "max_steps", "grad_accum", "data.max_rows", "data.shuffle", "save.keep"} <= online
    for command in ("sft", "rm", "dpo"):
        assert {"grad_accum", "num_epochs", "max_steps", "strategy", "data.eval_split", "logging.eval_steps",
                "save.steps"} <= set(_help_keys(command, capsys))


# --------------------------------------------------------------------------- enum keys


def test_an_enum_typo_names_the_key_the_value_and_the_closest_value():
    with pytest.raises(ConfigError) as e:
        load_config(DPOConfig, None, ["loss_type=sigmoidd"])
    assert str(e.value) == ("config key `loss_type`: unknown value `sigmoidd`; did you mean `sigmoid`? "
                            "(valid: sigmoid, ipo, hinge, robust, simpo, cpo, orpo)")


@pytest.mark.parametrize("command, key, bad, closest", [
    ("sft", "lr_scheduler", "cosin", "cosine"),
    ("sft", "task", "classify", "classification"),
    ("sft", "loss_on", "assistent", "assistant"),
    ("sft", "dtype", "bf16", "bfloat16"),
    ("sft", "strategy", "fsdb", "fsdp"),
    ("sft", "data.format", "preferences", "preference"),
    ("sft", "logging.report_to", "[jsonl, tensorbord]", "tensorboard"),
    ("online-dpo", "loss_type", "hing", "hinge"),
    ("online-dpo", "eval_task", "arithmetc", "arithmetic"),
    ("ppo", "kl_estimator", "k33", "k3"),
    ("ppo", "advantage_estimator", "rlooo", "rloo"),
    ("ppo", "critic_init", "polcy", "policy"),
    ("ppo", "reward.task", "arith", "arithmetic"),
    ("eval", "rollout.backend", "vlm", "vllm"),
    ("generate", "rollout.backend", "hff", "hf"),
    ("tiny-model", "size", "smal", "small"),
    ("task", "name", "sentimnt", "sentiment"),
    ("demo", "task", "arithmetik", "arithmetic"),
])
def test_enum_keys_are_checked_in_the_loader(capsys, command, key, bad, closest):
    assert main([command, f"{key}={bad}"]) == 2
    err = capsys.readouterr().err
    shown = bad.strip("[]").split(", ")[-1]
    assert f"config key `{key}`: unknown value `{shown}`; did you mean `{closest}`?" in err


def test_an_enum_value_far_from_any_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"`advantage_estimator`: unknown value `xyz` \(valid: gae, grpo, rloo, reinforce_pp\)"):
        load_config(PPOConfig, None, ["advantage_estimator=xyz"])
    with pytest.raises(ConfigError, match=r'unknown value `x` \(valid: "" \(none\), arithmetic'):
        load_config(PPOConfig, None, ["eval_task=x"])


def test_every_enum_value_loads():
    for cls in COMMANDS.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                for value in typing.get_args(hints[f.name]):
                    assert getattr(load_config(cls, None, {f.name: value}), f.name) == value


def test_the_enum_types_name_what_the_library_takes():
    """The library functions a user may call directly keep their own tuples; they agree with the config's types."""
    from posttrain import config
    from posttrain.data.formats import FORMATS
    from posttrain.data.tokenize import LOSS_ON
    from posttrain.engine.logging import REPORTERS
    from posttrain.engine.optim import SCHEDULERS
    from posttrain.losses import KL_ESTIMATORS, LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES
    from posttrain.models.tiny import SIZES
    from posttrain.recipes.demo import TASKS as DEMO_TASKS
    from posttrain.tasks import TASKS

    args = typing.get_args
    assert args(config.DPOLossType) == LOSS_TYPES == config.REFERENCE_LOSSES
    assert args(config.PrefLossType) == LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES
    assert args(config.KLEstimator) == KL_ESTIMATORS
    assert args(config.LRScheduler) == SCHEDULERS
    assert args(config.LossOn) == LOSS_ON
    assert args(config.DataFormat) == ("auto", *FORMATS)
    assert args(config.Reporter) == REPORTERS
    assert args(config.TaskName) == tuple(TASKS) and args(config.OptionalTask) == ("", *TASKS)
    assert args(config.TinySize) == tuple(SIZES)
    assert args(config.DemoTask) == tuple(DEMO_TASKS)


# --------------------------------------------------------------------------- keys honoured where they were ignored


def test_online_dpo_shuffle_off_takes_the_prompts_in_file_order():
    """10 prompts, 4 a round, data.shuffle false: round 1 = 0..3, round 3 = positions 8..11 = 8, 9, 0, 1 (the second
    pass starts over in file order). Shuffled (the default), round 1 is a seeded permutation's first 4."""
    from posttrain.config import OnlineDPOConfig, PromptDataConfig
    from posttrain.recipes.online_dpo import round_prompts

    prompts = [{"i": i} for i in range(10)]
    ordered = OnlineDPOConfig(prompts_per_round=4, data=PromptDataConfig(shuffle=False))
    assert [p["i"] for p in round_prompts(prompts, ordered, 1)] == [0, 1, 2, 3]
    assert [p["i"] for p in round_prompts(prompts, ordered, 3)] == [8, 9, 0, 1]
    shuffled = [p["i"] for p in round_prompts(prompts, OnlineDPOConfig(prompts_per_round=4), 1)]
    assert shuffled != [0, 1, 2, 3] and len(set(shuffled)) == 4


def test_online_dpo_max_rows_keeps_the_first_prompts(tiny_model, arith_dir, tmp_path, capsys):
    """data.max_rows=3: the run samples from the file's first 3 prompts only (it used to read every prompt)."""
    args = ["online-dpo", f"model={tiny_model}", f"prompts={arith_dir / 'prompts.jsonl'}", f"output_dir={tmp_path}",
            "data.max_rows=3", "rounds=1", "prompts_per_round=2", "samples_per_prompt=2", "rollout.max_new_tokens=2",
            "reward.task=arithmetic", "max_length=96", "logging.progress=false"]
    assert main(args) == 0
    assert "prompts: 3;" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM installed: the backend would load")
@pytest.mark.parametrize("command", ["eval", "generate"])
def test_rollout_backend_vllm_is_used_by_eval_and_generate(tiny_model, tmp_path, capsys, command):
    """rollout.backend=vllm reaches the vLLM backend (it used to sample with hf regardless): without the extra
    installed, the run stops naming it."""
    args = ([command, str(tiny_model), "task=arithmetic", f"output={tmp_path / 'e.json'}", "num_prompts=2"]
            if command == "eval" else [command, str(tiny_model), "hi"])
    assert main([*args, "rollout.backend=vllm", "rollout.max_new_tokens=2"]) == 2
    assert "rollout.backend=vllm needs vLLM: pip install 'posttrain[vllm]'" in capsys.readouterr().err


@pytest.mark.parametrize("extra,key", [(["task=classification", "packing=true"], "packing"),
                                       (["task=classification", "loss_on=all"], "loss_on"),
                                       (["num_labels=3"], "num_labels")])
def test_sft_refuses_the_other_tasks_keys_by_name(tiny_model, tmp_path, capsys, extra, key):
    """A key of task=causal_lm with task=classification (and the reverse) would be ignored: it is refused before
    the run writes anything."""
    out = tmp_path / "run"
    assert main(["sft", f"model={tiny_model}", "data.train=task:sentiment/classify.jsonl", f"output_dir={out}",
                 "max_steps=1", *extra]) == 2
    assert f"`{key}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("overrides, key", [
    (["loss_type=simpo", "ref_model=some/folder"], "ref_model"),
    (["loss_type=orpo", "precompute_ref=false"], "precompute_ref"),
    (["loss_type=cpo", "precompute_ref=true"], "precompute_ref"),
    (["cpo_alpha=0.5"], "cpo_alpha"),
    (["loss_type=cpo", "simpo_gamma=1.0"], "simpo_gamma"),
    (["loss_type=orpo", "sft_weight=0.1"], "sft_weight"),
    (["loss_type=ipo", "label_smoothing=0.1"], "label_smoothing"),
])
def test_dpo_refuses_a_key_its_loss_type_does_not_use(overrides, key):
    """A key set explicitly that the chosen loss_type ignores is refused by name (a default is never refused)."""
    with pytest.raises(ConfigError, match=f"`{key}` does not apply with loss_type="):
        load_config(DPOConfig, None, overrides)


def test_dpo_keys_of_the_loss_type_are_accepted():
    cfg = load_config(DPOConfig, None, ["loss_type=simpo", "simpo_gamma=1.2", "beta=2", "sft_weight=0.1",
                                        "label_smoothing=0.05"])
    assert (cfg.simpo_gamma, cfg.beta, cfg.sft_weight) == (1.2, 2.0, 0.1)
    assert load_config(DPOConfig, None, ["loss_type=cpo", "cpo_alpha=0.5"]).cpo_alpha == 0.5
    assert load_config(DPOConfig, None, ["ref_model=x", "precompute_ref=false"]).ref_model == "x"


def test_kto_refuses_dpo_only_keys_by_name():
    from posttrain.config import KTOConfig
    for key in ("precompute_ref=false", "loss_type=sigmoid", "label_smoothing=0.1", "sft_weight=0.1"):
        with pytest.raises(ConfigError, match=f"`{key.split('=')[0]}` is not accepted: kto"):
            load_config(KTOConfig, None, [key])
