"""`posttrain online-dpo`: two rounds end to end with the arithmetic verifier; resume continues at the next round."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.config import OnlineDPOConfig
from posttrain.engine import read_metrics
from posttrain.recipes.online_dpo import round_prompts

# A random tiny model never gets an arithmetic answer right, so with the verifier alone every sample ties at 0
# and no pair forms. A small length term (weight 0.01, shorter is better) breaks the ties; the verifier's 1.0
# still dominates as soon as any sample is right.
LENGTH_REWARD = "def shorter(prompts, completions):\n    return [-len(c) / 100 for c in completions]\n"


def online_args(model, arith_dir, out, fn_file, *extra):
    return ["online-dpo", f"model={model}", f"prompts={arith_dir / 'prompts.jsonl'}", f"output_dir={out}",
            "prompts_per_round=6", "samples_per_prompt=3", "rollout.max_new_tokens=12", "reward.task=arithmetic",
            f"reward.function={fn_file}:shorter", "reward.weights=[0.01,1.0]", "eval_task=arithmetic",
            "eval_prompts=6", "batch_size=4", "learning_rate=1e-3", "beta=0.5", "max_length=96",
            "logging.progress=false", "logging.steps=1", *extra]


@pytest.fixture(scope="module")
def fn_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "length.py"
    path.write_text(LENGTH_REWARD)
    return path


@pytest.fixture(scope="module")
def two_rounds(tiny_model, arith_dir, fn_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("online") / "run"
    assert main(online_args(tiny_model, arith_dir, out, fn_file, "rounds=2")) == 0
    return out


def test_two_rounds_end_to_end(two_rounds):
    rows = read_metrics(two_rounds / "metrics.jsonl")
    rounds = [r for r in rows if "pairs" in r]
    assert [r["round"] for r in rounds] == [1, 2]
    start = [r for r in rows if r.get("round") == 0]
    assert len(start) == 1 and 0.0 <= start[0]["eval_gold_reward"] <= 1.0  # the starting model, before round 1
    for r in rounds:
        assert 1 <= r["pairs"] <= 6 and r["reward/max"] >= r["reward/mean"]
        for key in ("eval_gold_reward", "rollout/eos_rate", "loss", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "grad_norm", "learning_rate"):
            assert key in r, key
    # every DPO step is logged with its round, at a step that keeps counting across rounds
    steps = [r for r in rows if "loss" in r and "pairs" not in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1)) and {r["round"] for r in steps} == {1, 2}
    assert rounds[-1]["step"] == len(steps)
    # checkpoints at round ends; the final model loads
    assert (two_rounds / "checkpoints" / f"step-{len(steps)}" / "trainer_state.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(two_rounds / "final").config.vocab_size > 0


def test_resume_continues_at_the_next_round(tiny_model, arith_dir, fn_file, two_rounds, tmp_path):
    """1 round, then rounds=2 resume=auto: only round 2 runs, and the final weights equal the uninterrupted run's
    (round samples depend on (seed, round) only; each round starts a fresh optimizer)."""
    out = tmp_path / "cut"
    assert main(online_args(tiny_model, arith_dir, out, fn_file, "rounds=1")) == 0
    assert main(online_args(tiny_model, arith_dir, out, fn_file, "rounds=2", "resume=auto")) == 0
    rounds = [r["round"] for r in read_metrics(out / "metrics.jsonl") if "pairs" in r]
    assert rounds == [1, 2]
    a, b = load_file(two_rounds / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_round_prompts_use_every_prompt_before_repeating():
    cfg = OnlineDPOConfig(prompts_per_round=4, seed=3)
    prompts = [{"i": i} for i in range(10)]
    seen = [p["i"] for r in (1, 2) for p in round_prompts(prompts, cfg, r)]
    third = [p["i"] for p in round_prompts(prompts, cfg, 3)]
    assert len(set(seen)) == 8 and len(set(seen + third[:2])) == 10  # positions 8, 9 finish the first pass
    assert round_prompts(prompts, cfg, 2) == round_prompts(prompts, cfg, 2)


def test_no_prompts_is_a_config_error(tiny_model, tmp_path, capsys):
    assert main(["online-dpo", f"model={tiny_model}", f"output_dir={tmp_path}", "reward.task=arithmetic"]) == 2
    assert "prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, arith_dir, fn_file, tmp_path):
    """torchrun with 2 gloo ranks == 1 process for two rounds: each rank samples 3 of the 6 prompts with the
    one-process uniforms and caches its own pairs' reference log-probs; the gathered pairs, the round stats, the
    held-out eval and the final weights agree (float32 rounding)."""
    from tests.recipes.multiproc import assert_same_trained_weights, run_two_processes

    extra = ["rounds=2", "dtype=float32"]  # 6 pairs a round: one step of 6 on one process, of 3 + 3 on two
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(online_args(tiny_model, arith_dir, one, fn_file, *extra, "batch_size=6")) == 0
    run_two_processes(online_args(tiny_model, arith_dir, two, fn_file, *extra, "batch_size=3"))
    rows1 = [r for r in read_metrics(one / "metrics.jsonl") if "pairs" in r or r.get("round") == 0]
    rows2 = [r for r in read_metrics(two / "metrics.jsonl") if "pairs" in r or r.get("round") == 0]
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] and len(rows1) == 3
    assert rows1[1]["pairs"] >= 2  # the rounds trained on pairs from both halves' prompts
    for a, b in zip(rows1, rows2):
        for key in ("pairs", "eval_gold_reward", "rollout/response_length", "rollout/eos_rate"):
            assert a.get(key) == b.get(key), key
        for key in ("reward/mean", "reward/max", "loss", "rewards/margins", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert_same_trained_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")
