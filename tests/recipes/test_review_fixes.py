"""Fixes from the algorithm review (issue 14), each pinned: online DPO's truncated samples, RLOO's per-sequence
whitening, k2 / k3 in the reward, sampling keys out of range, missing_eos_penalty's sign."""

from __future__ import annotations

import warnings

import pytest
import torch

from posttrain.config import (ConfigError, OnlineDPOConfig, PPOConfig, RewardConfig, RolloutConfig, SamplingConfig,
                              help_text, load_config)
from posttrain.engine.dist import RolloutShare
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.recipes.online_dpo import check_online_config, sample_pairs
from posttrain.recipes.ppo import advantages_for, check_config
from posttrain.recipes.prompts import Prompts
from posttrain.rewards import build_reward
from posttrain.rollout.sampler import Sampler
from tests.recipes.test_closed_form_ppo import char_model

# --------------------------------------------------------------------------- online DPO: truncated samples


def test_online_dpo_never_chooses_a_truncated_sample_over_a_finished_one(tmp_path):
    """Char vocabulary, one token per response: a sample is EOS (finished) or another token (truncated at
    max_new_tokens=1). The reward, read from completion_ids, is 1 for a truncated sample and 0 for a finished one,
    so pairs form exactly in groups holding both kinds. Without a penalty every chosen sample is a truncated one;
    with missing_eos_penalty=-10 a truncated sample scores 1 - 10 = -9 < 0: every chosen one is finished."""
    char_model(tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    (tmp_path / "r.py").write_text(f"def longer(completions, completion_ids, **kwargs):\n"
                                   f"    return [0.0 if ids[-1] == {tok.eos_token_id} else 1.0 for ids in completion_ids]\n")
    model = load_causal_lm(tmp_path / "m", tokenizer=tok)
    sampler = Sampler(model, tok, RolloutConfig(max_new_tokens=1))
    reward = build_reward(RewardConfig(function=f"{tmp_path / 'r.py'}:longer"))
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    prompts = Prompts([[{"role": "user", "content": "hi"}]] * 8, [list(ids)] * 8)
    k, eos = 64, tok.eos_token_id

    def chosen_end_with_eos(penalty):
        pairs, stats = sample_pairs(sampler, tok, reward, prompts, k, torch.Generator().manual_seed(0),
                                    RolloutShare(len(prompts), k, None), missing_eos_penalty=penalty)
        assert 0.9 < stats["rewards/longer/mean"] < 1.0  # the reward's own mean, before the penalty
        return [p["chosen_ids"][-1] == eos for p in pairs], [p["rejected_ids"][-1] == eos for p in pairs]

    chosen, rejected = chosen_end_with_eos(0.0)
    assert chosen and not any(chosen) and all(rejected)  # the bug: a truncated sample always wins
    chosen, rejected = chosen_end_with_eos(-10.0)
    assert chosen and all(chosen) and not any(rejected)  # same samples (same seed): now finished beats truncated


# --------------------------------------------------------------------------- RLOO


def test_rloo_advantages_are_whitened_per_sequence_not_per_token():
    """k = 2 samples of one prompt, scores (1, 0), no KL, response lengths 1 and 3 tokens.
    RLOO: A = (1 - 0, 0 - 1) = (1, -1), one value per sequence. Whitened over the 2 sequences: mean 0, sample std
    sqrt(2) -> (0.7071, -0.7071) on every token of each. (Whitening the 4 tokens instead: mean -0.5,
    var (1.5^2 + 3 * 0.5^2) / 3 = 1 -> 1.5 and -0.5: the long response would weigh three times.)"""
    cfg = PPOConfig(advantage_estimator="rloo", rollout=RolloutConfig(batch_size=2, samples_per_prompt=2))
    mask = torch.tensor([[True, False, False], [True, True, True]])
    kl = torch.zeros(2, 3)
    adv, returns = advantages_for(cfg, torch.tensor([1.0, 0.0]), kl, None, mask, 0.1, RolloutShare(1, 2, None))
    r = 2 ** -0.5
    torch.testing.assert_close(adv, torch.tensor([[r, 0.0, 0.0], [-r, -r, -r]]), rtol=0, atol=1e-4)
    assert returns is None


# --------------------------------------------------------------------------- k2 / k3 in the reward


@pytest.mark.parametrize("estimator,advantage,warns", [("k1", "gae", False), ("k2", "gae", True), ("k3", "rloo", True),
                                                        ("k3", "reinforce_pp", True), ("k3", "grpo", False)])
def test_k2_k3_in_the_reward_warn(estimator, advantage, warns):
    """k2 / k3 put in the reward bias the policy gradient of the KL; grpo's KL is in the loss, so no warning."""
    cfg = PPOConfig(kl_estimator=estimator, advantage_estimator=advantage,
                    rollout=RolloutConfig(batch_size=64, samples_per_prompt=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_config(cfg)
    assert any("biased" in str(w.message) and estimator in str(w.message) for w in caught) == warns
    assert "unbiased policy gradient" in help_text(PPOConfig)


# --------------------------------------------------------------------------- sampling keys


@pytest.mark.parametrize("override,key", [("rollout.top_p=0", "rollout.top_p"), ("rollout.top_p=-0.5", "rollout.top_p"),
                                          ("rollout.top_p=1.5", "rollout.top_p"), ("rollout.top_k=-1", "rollout.top_k")])
@pytest.mark.parametrize("cls", [PPOConfig, OnlineDPOConfig])
def test_top_p_top_k_out_of_range_are_refused_by_name(cls, override, key):
    with pytest.raises(ConfigError, match=f"`{key}` must be"):
        load_config(cls, overrides=[override])
    with pytest.raises(ConfigError, match="rollout.top_p"):
        SamplingConfig(top_p=0.0)
    assert load_config(cls, overrides=["rollout.top_p=1.0", "rollout.top_k=0"]).rollout.top_p == 1.0


# --------------------------------------------------------------------------- missing_eos_penalty's sign


def test_a_positive_missing_eos_penalty_is_refused_with_the_sign_explained():
    """TRL's missing_eos_penalty is positive and subtracted; here it is added, so a TRL value (1.0) would pay
    for truncation: refused in ppo and online-dpo, naming the key and the value to write instead."""
    with pytest.raises(ConfigError, match=r"missing_eos_penalty: 1` would REWARD.*TRL.*missing_eos_penalty=-1"):
        check_config(PPOConfig(missing_eos_penalty=1.0))
    with pytest.raises(ConfigError, match="missing_eos_penalty"):
        check_online_config(OnlineDPOConfig(missing_eos_penalty=0.5, prompts=["p.jsonl"]))
    check_online_config(OnlineDPOConfig(missing_eos_penalty=-1.0, prompts=["p.jsonl"]))
    for cls in (PPOConfig, OnlineDPOConfig):
        assert "TRL's key of this name is positive and SUBTRACTED; here it is ADDED" in " ".join(help_text(cls).split())


# --------------------------------------------------------------------------- the column path end to end


def test_ppo_math_example_reads_the_answer_column_end_to_end(tiny_model, tmp_path):
    """examples/ppo_math.yaml on the embedded default for one iteration: the rollout carries each prompt row's
    `answer` to the built-in math-verify reward and to the held-out gold evaluation; each reward is logged."""
    from posttrain.cli import main
    from posttrain.engine import read_metrics

    out = tmp_path / "run"
    assert main(["ppo", "examples/ppo_math.yaml", f"model={tiny_model}", f"output_dir={out}", "total_episodes=8",
                 "rollout.batch_size=8", "mini_batch_size=8", "batch_size=8", "ppo_epochs=1", "eval_prompts=4",
                 "rollout.max_new_tokens=8"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    last = rows[-1]
    for key in ("rewards/math_accuracy/mean", "rewards/math_accuracy/std", "rewards/boxed_format/mean",
                "eval/gold_accuracy"):
        assert key in last and 0.0 <= last[key] <= 1.0, key
