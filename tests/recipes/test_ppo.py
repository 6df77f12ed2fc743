"""`posttrain ppo` end to end on tiny models: every estimator runs, a resumed run equals an
uninterrupted one, the EMA reference moves by exactly eta, a response without EOS is penalised,
bad configs fail with the key's name. The closed-form optimum check is in test_closed_form_ppo.py."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from posttrain.cli import main
from posttrain.config import PPOConfig, RewardConfig, RolloutConfig
from posttrain.engine import read_metrics
from posttrain.engine.dist import RolloutShare
from posttrain.models import load_causal_lm, load_sequence_classifier, load_tokenizer
from posttrain.models import token_logprobs
from posttrain.recipes.ppo import (Models, Prompts, advantages_for, build_ppo_optimizer, load_models, make_experience,
                                   masked_kl, response_logprobs, rollout_and_score)
from posttrain.rewards import build_reward
from posttrain.rollout.sampler import Sampler
from tests.recipes.multiproc import assert_same_trained_weights, run_two_processes
from tests.recipes.test_closed_form_ppo import char_model

TRL_METRICS = ["objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
               "objective/non_score_reward", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
               "val/num_eos_tokens", "rollout/seconds", "train/seconds", "episodes", "learning_rate"]


def ppo_args(model, arith_dir, out, *extra):
    return ["ppo", f"model={model}", f"prompts={arith_dir / 'prompts.jsonl'}", f"output_dir={out}",
            "reward.task=arithmetic", "rollout.batch_size=8", "rollout.max_new_tokens=8", "total_episodes=16",
            "mini_batch_size=4", "batch_size=2", "ppo_epochs=1", "learning_rate=1e-3", "logging.progress=false",
            *extra]


def iterations(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "objective/kl" in r]


def test_gae_with_a_reward_model_critic_logs_trl_metrics_gold_and_saves(tiny_model, arith_dir, tmp_path):
    """critic_init auto = the reward model; the gold verifier score is logged beside the proxy reward."""
    rm = tmp_path / "rm"
    load_sequence_classifier(tiny_model, num_labels=1, tokenizer=load_tokenizer(tiny_model)).save_pretrained(rm)
    load_tokenizer(tiny_model).save_pretrained(rm)
    out = tmp_path / "gae"
    args = ppo_args(tiny_model, arith_dir, out, f"reward.model={rm}", "reward.task=", "eval_task=arithmetic",
                    "eval_prompts=8", "eval_every=1")
    assert main(args) == 0
    rows = iterations(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["episodes"] == 16
    for r in rows:
        assert all(k in r for k in TRL_METRICS + ["loss/value_avg", "val/clipfrac_avg", "objective/gold", "eval/gold_accuracy"])
    # the policy equals the reference before the first update: the KL of the first batch is 0
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["objective/rlhf_reward"] == pytest.approx(rows[0]["objective/scores"] + rows[0]["objective/non_score_reward"], abs=1e-5)
    start = read_metrics(out / "metrics.jsonl")[0]
    assert start["step"] == 0 and "eval/sampled_accuracy" in start
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4
    assert AutoModelForSequenceClassification.from_pretrained(out / "final" / "critic").config.num_labels == 1
    assert (out / "final" / "config.json").is_file()


@pytest.mark.parametrize("estimator,extra", [("grpo", []), ("rloo", ["lora.r=4"]), ("reinforce_pp", ["rollout.samples_per_prompt=1"])])
def test_critic_free_estimators_run_end_to_end(tiny_model, arith_dir, tmp_path, estimator, extra):
    out = tmp_path / estimator
    args = ppo_args(tiny_model, arith_dir, out, f"advantage_estimator={estimator}", "rollout.samples_per_prompt=4", *extra)
    assert main(args) == 0
    rows = iterations(out)
    assert len(rows) == 2 and all(k in r for r in rows for k in TRL_METRICS)
    assert "loss/value_avg" not in rows[0]  # no critic at all
    # groups of 4 samples: the share of prompts whose samples all got one reward (TRL's name); no groups of 1
    assert all(0.0 <= r["frac_reward_zero_std"] <= 1.0 if estimator != "reinforce_pp" else "frac_reward_zero_std" not in r
               for r in rows)
    assert not (out / "final" / "critic").exists()
    # LoRA: the reference is the adapter-disabled base, equal to the policy before the first update
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)


def test_sigterm_then_resume_equals_uninterrupted(tiny_model, arith_dir, tmp_path):
    """Stop a run with SIGTERM after an iteration, resume it with resume=auto: the policy and critic weights equal
    the uninterrupted run's bit for bit (the EMA reference, optimizer, schedule and adaptive KL state are restored)."""
    extra = ["total_episodes=48", "ref_ema=0.1", "adaptive_kl_target=0.01", "critic_init=policy", "logging.steps=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(ppo_args(tiny_model, arith_dir, full, *extra)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", *ppo_args(tiny_model, arith_dir, cut, *extra)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((cut / "metrics.jsonl").is_file() and iterations(cut)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "saved checkpoint" in out and not (cut / "final").exists()
    stopped_at = max(int(p.name.split("-")[1]) for p in (cut / "checkpoints").glob("step-*"))
    assert 1 <= stopped_at < 6
    assert main(ppo_args(tiny_model, arith_dir, cut, *extra)) == 0
    assert [r["step"] for r in iterations(cut)][-1] == 6
    for part in ("model.safetensors", "critic/model.safetensors"):
        a, b = load_file(full / "final" / part), load_file(cut / "final" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert iterations(full)[-1]["objective/kl_coef"] == iterations(cut)[-1]["objective/kl_coef"] != 0.05


def test_reference_ema_moves_exactly_eta_toward_the_policy(tiny_model, arith_dir, tmp_path):
    """One optimizer step per iteration; after iteration 1: ref_1 = eta * policy_1 + (1 - eta) * ref_0, ref_0 = the start."""
    eta, out = 0.25, tmp_path / "ema"
    (tmp_path / "r.py").write_text("def reward(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")
    assert main(ppo_args(tiny_model, arith_dir, out, f"ref_ema={eta}", "mini_batch_size=8", "advantage_estimator=rloo",
                         "reward.task=", f"reward.function={tmp_path / 'r.py'}:reward",
                         "rollout.samples_per_prompt=2", "save.steps=1")) == 0
    saved = load_file(out / "checkpoints" / "step-1" / "model.safetensors")
    start = load_causal_lm(tiny_model, tokenizer=load_tokenizer(tiny_model)).state_dict()
    moved = 0
    for name, ref0 in start.items():
        if f"ref.{name}" not in saved:
            continue  # a tied copy (lm_head = embeddings) is stored once
        policy1, ref1 = saved[f"policy.{name}"], saved[f"ref.{name}"]
        torch.testing.assert_close(ref1, eta * policy1 + (1 - eta) * ref0, rtol=0, atol=1e-6)
        moved += int(not torch.equal(ref1, ref0))
    assert moved > 0


def test_a_response_without_eos_gets_the_penalty(tmp_path):
    """Char vocabulary, one token per response: a row is EOS (decodes to "") or not. Reward 0.5 for every
    text and missing_eos_penalty -1 give the score vector 0.5 where the row is EOS, -0.5 elsewhere."""
    char_model(tmp_path / "m")
    (tmp_path / "r.py").write_text("def reward(prompts, completions):\n    return [0.5] * len(completions)\n")
    tok = load_tokenizer(tmp_path / "m")
    model = load_causal_lm(tmp_path / "m", tokenizer=tok)
    cfg = PPOConfig(rollout=RolloutConfig(batch_size=256, max_new_tokens=1), reward=RewardConfig(function=f"{tmp_path / 'r.py'}:reward"),
                    missing_eos_penalty=-1.0)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    prompts = Prompts([[{"role": "user", "content": "hi"}]], [list(ids)])
    batch, scores, _, stats = rollout_and_score(cfg, Sampler(model, tok, cfg.rollout), build_reward(cfg.reward), tok, prompts, 0,
                                                torch.Generator().manual_seed(0), None,
                                                RolloutShare(256 // cfg.rollout.samples_per_prompt, cfg.rollout.samples_per_prompt, None))
    has_eos = (batch.response_ids == tok.eos_token_id).any(1)  # (N,)
    assert 0 < int(has_eos.sum()) < 256  # both kinds occur (the EOS probability is ~1/55 per row)
    assert torch.equal(scores, torch.where(has_eos, torch.tensor(0.5), torch.tensor(-0.5)))
    assert stats["val/num_eos_tokens"] == int(has_eos.sum())


@pytest.mark.parametrize("bad,key", [(["advantage_estimator=grpo", "rollout.samples_per_prompt=1"], "samples_per_prompt"),
                                     (["ref_ema=0.1", "lora.r=4"], "ref_ema"), (["kl_estimator=k4"], "kl_estimator"),
                                     (["kl_coef=0", "ref_ema=0.1"], "ref_ema"),
                                     (["kl_coef=0", "adaptive_kl_target=0.01"], "adaptive_kl_target"),
                                     (["rollout.batch_size=6", "rollout.samples_per_prompt=4"], "rollout.batch_size"),
                                     (["critic_init=reward"], "critic_init"), (["strategy=fsdp"], "`strategy` is not accepted"),
                                     (["advantage_estimator=gea"], "did you mean `gae`")])
def test_bad_config_names_the_key(tiny_model, arith_dir, tmp_path, capsys, bad, key):
    assert main(ppo_args(tiny_model, arith_dir, tmp_path / "bad", *bad)) == 2
    assert key in capsys.readouterr().err


def test_response_logprobs_project_only_the_response_float64(tiny_model):
    """`response_logprobs` sends only positions P-1.. through the vocabulary projection: values and gradients equal
    the full-width `token_logprobs` sliced at P-1 (left-padded rows of different prompt and response lengths)."""
    policy = load_causal_lm(tiny_model, dtype=torch.float64, tokenizer=load_tokenizer(tiny_model))
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(4, 200, (3, 11), generator=g)  # (N, P+R), P = 5
    attn = torch.ones_like(seqs)
    attn[0, :2] = 0  # left padding of a shorter prompt
    attn[1, 9:] = 0  # a response that ended early
    pos, p = (attn.cumsum(-1) - 1).clamp(min=0), 5
    weights = torch.randn((3, 6), generator=g, dtype=torch.float64)  # (N, R)
    results = []
    for fn in (lambda: token_logprobs(policy, seqs, attn, pos, temperature=0.7)[:, p - 1:],
               lambda: response_logprobs(policy, seqs, attn, pos, p, 0.7)):
        policy.zero_grad(set_to_none=True)
        logp = fn()  # (N, R)
        (logp * weights).sum().backward()
        results.append((logp.detach(), [q.grad.clone() for q in policy.parameters()]))
    (full, full_grads), (sliced, sliced_grads) = results
    assert sliced.shape == (3, 6)
    torch.testing.assert_close(sliced, full, rtol=0, atol=1e-12)
    for a, b in zip(sliced_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fused_optimizer_equals_the_per_parameter_adamw(tiny_model):
    """build_ppo_optimizer uses the fused AdamW kernel: three steps with weight decay and two learning rates (actor,
    critic) leave every weight where torch's default per-parameter AdamW leaves it, up to float32 rounding (the
    vectorised kernel rounds some products differently: a few ulps, rtol 1e-6)."""
    tok = load_tokenizer(tiny_model)

    def build() -> Models:
        return Models(load_causal_lm(tiny_model, tokenizer=tok), None, load_sequence_classifier(tiny_model, num_labels=1, tokenizer=tok))

    def params(m: Models) -> list:
        return list(m.policy.parameters()) + list(m.critic.parameters())

    models, twin = build(), build()
    twin.critic.load_state_dict(models.critic.state_dict())  # the new score head is random
    cfg = PPOConfig(learning_rate=1e-3, critic_learning_rate=3e-3, weight_decay=0.1)
    fused = build_ppo_optimizer(cfg, models)
    assert all(group["fused"] for group in fused.param_groups)
    mirror = dict(zip(map(id, params(models)), params(twin)))
    plain = torch.optim.AdamW([{"params": [mirror[id(q)] for q in grp["params"]], "lr": grp["lr"], "weight_decay": grp["weight_decay"]}
                               for grp in fused.param_groups], lr=1e-3, fused=False, foreach=False)
    pairs = [(q, mirror[id(q)]) for grp in fused.param_groups for q in grp["params"]]
    start = [a.detach().clone() for a, _ in pairs]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in pairs:
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    moved = sum(not torch.equal(a, a0) for (a, _), a0 in zip(pairs, start))
    assert moved == len(pairs)


def test_world_size_must_split_the_global_batches():
    from posttrain.config import ConfigError
    from posttrain.recipes.ppo import check_world

    cfg = PPOConfig(rollout=RolloutConfig(batch_size=8, samples_per_prompt=2), mini_batch_size=4)
    check_world(cfg, 2)  # 2 prompts x 2 samples a rank; 2 sequences a rank per optimizer step
    with pytest.raises(ConfigError, match="rollout.batch_size"):
        check_world(cfg, 3)
    with pytest.raises(ConfigError, match="mini_batch_size"):
        check_world(PPOConfig(rollout=RolloutConfig(batch_size=12), mini_batch_size=6), 4)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, arith_dir, tmp_path):
    """torchrun with 2 gloo ranks == 1 process: same global rollout (8 episodes, 2 samples per prompt), GAE with a
    critic, reward and advantage whitening over the whole batch, an adaptive KL, 2 PPO epochs of one optimizer step
    over all 8 rows (micro-batches of 2 on each rank), a held-out eval split over the ranks. Each rank samples its
    4 rows with the one-process run's uniforms, so the samples, the logged batch statistics and the final policy
    and critic weights agree up to float32 rounding. The 2-process run resumed from its iteration-1 checkpoint ends
    on its weights bit for bit."""
    (tmp_path / "r.py").write_text("def reward(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")
    extra = ["reward.task=", f"reward.function={tmp_path / 'r.py'}:reward",
             "rollout.samples_per_prompt=2", "mini_batch_size=8", "ppo_epochs=2", "critic_init=policy",
             "whiten_rewards=true", "adaptive_kl_target=0.01", "eval_task=arithmetic", "eval_prompts=6",
             "eval_every=1", "dtype=float32", "rollout.temperature=1.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(ppo_args(tiny_model, arith_dir, one, *extra)) == 0
    resumed = tmp_path / "resumed"
    for out, more in ((two, ["save.steps=1"]), (resumed, [f"resume={two / 'checkpoints' / 'step-1'}"])):
        proc = run_two_processes(ppo_args(tiny_model, arith_dir, out, *extra, *more))
    assert proc.stdout.count("resumed from") == 1  # rank 0 says it
    rows1, rows2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [0, 1, 2]
    assert len({r["objective/scores"] for r in rows1[1:]}) > 1  # varied rewards: whitening has work to do
    for a, b in zip(rows1, rows2):
        assert a.keys() == b.keys()
        for key in ("eval/gold_accuracy", "eval/sampled_accuracy", "val/num_eos_tokens", "rollout/response_length"):
            assert a.get(key) == b.get(key), key  # the same samples
        for key in ("objective/scores", "objective/kl", "objective/entropy", "objective/kl_coef", "loss/policy_avg", "loss/value_avg",
                    "policy/approxkl_avg"):
            if key in a:
                assert a.get(key) == pytest.approx(b.get(key), rel=1e-4, abs=1e-5), key
    assert rows1[-1]["objective/kl"] != 0.0  # the policy moved: the second rollout is not the reference's
    for part in ("model.safetensors", "critic/model.safetensors"):
        assert_same_trained_weights(one / "final" / part, two / "final" / part)
        # the 2-process run resumed from its iteration-1 checkpoint (policy, critic, optimizer, KL state on each rank)
        b, c = load_file(two / "final" / part), load_file(resumed / "final" / part)
        assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)


def test_kl_coef_zero_loads_and_runs_no_reference_and_changes_no_number(tiny_model, arith_dir, tmp_path):
    """kl_coef = 0: `load_models` keeps no reference copy, and `make_experience` never calls a reference (a forward
    hook counts its calls: none, against some at kl_coef = 0.1). The advantages and returns are those of the KL terms
    computed with a reference that differs from the policy and then weighted by 0 (-0 * kl_t = 0 in every per-token
    reward), exactly. End to end, a GRPO run with kl_coef=0 trains and logs no `objective/kl`."""
    tok = load_tokenizer(tiny_model)
    cfg = PPOConfig(model=tiny_model, kl_coef=0.0, critic_init="policy", rollout=RolloutConfig(
        batch_size=8, samples_per_prompt=2, max_new_tokens=6, temperature=1.0))
    assert load_models(cfg, tok, torch.device("cpu")).ref is None
    models = load_models(PPOConfig(model=tiny_model, critic_init="policy"), tok, torch.device("cpu"))
    with torch.no_grad():
        for w in models.ref.parameters():
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    calls = []
    models.ref.register_forward_hook(lambda *args: calls.append(1))
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for q in ("1+2=", "30+4=", "5+6=", "7+80=")]
    batch = Sampler(models.policy, tok, cfg.rollout).generate(prompts, num_samples=2,
                                                              generator=torch.Generator().manual_seed(0))
    scores, share = torch.linspace(-1, 1, 8), RolloutShare(4, 2, None)
    exp, stats = make_experience(cfg, models, batch, scores, 0.0, None, share, sampled_logp=batch.logprobs)
    assert calls == [] and exp.ref_logp is None and "objective/kl" not in stats
    with_ref, _ = make_experience(cfg, models, batch, scores, 0.1, None, share, sampled_logp=batch.logprobs)
    assert calls  # the same call with kl_coef = 0.1 runs the reference
    kl = masked_kl(exp.old_logp, with_ref.ref_logp, exp.mask, cfg.kl_estimator)
    assert float(kl.abs().sum()) > 0  # a reference that differs: the KL is there, and weighted by 0
    adv, returns = advantages_for(cfg, scores, kl, exp.values, exp.mask, 0.0, share)
    assert torch.equal(exp.advantages, adv) and torch.equal(exp.returns, returns)

    out = tmp_path / "grpo0"
    assert main(ppo_args(tiny_model, arith_dir, out, "kl_coef=0", "advantage_estimator=grpo",
                         "rollout.samples_per_prompt=4")) == 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "objective/scores" in r]
    assert len(rows) == 2 and not any("objective/kl" in r for r in rows)
    assert all(r["objective/non_score_reward"] == 0 for r in rows)
