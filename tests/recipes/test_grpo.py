"""`posttrain grpo` on the tiny model: TRL's metrics, each key's effect, no reference at beta 0, the loss fn equal to
the pure functions on the model's own log-probs, resume, 2 ranks == 1, and reward rising on arithmetic after SFT."""

import copy
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.config import GRPOConfig, LoraConfig
from posttrain.engine import read_metrics
from posttrain.engine.dist import RolloutShare
from posttrain.losses import aggregate, clipped_surrogate, group_advantages, k3_kl, kl_estimate
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.recipes.grpo import Generation, grpo_loss_fn, load_models, make_experience, response_logprobs
from posttrain.rollout.sampler import Sampler
from tests.recipes.multiproc import assert_same_trained_weights, run_two_processes

TRL_METRICS = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
               "completions/max_length", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean",
               "clip_ratio/low_mean", "clip_ratio/high_mean", "loss", "grad_norm", "learning_rate", "episodes"]


def grpo_args(model, arith_dir, out, *extra):
    return ["grpo", f"model={model}", f"prompts={arith_dir / 'prompts.jsonl'}", f"output_dir={out}",
            "reward.task=arithmetic", "rollout.batch_size=8", "num_generations=4", "rollout.max_new_tokens=8",
            "total_episodes=16", "batch_size=4", "learning_rate=1e-3", "logging.progress=false", "logging.steps=1",
            *extra]


def generations(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]


@pytest.fixture(scope="module")
def constant_reward(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "r.py"
    path.write_text("def zero(prompts, completions):\n    return [0.0] * len(completions)\n\n"
                    "def length(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")
    return path


def test_run_logs_trl_metrics_gold_and_saves(tiny_model, arith_dir, tmp_path):
    """beta > 0 (k3 in the loss, `kl` logged), the soft overlong penalty (the untrained model runs to
    max_new_tokens: the reward goes below the verifier's 0), held-out gold at the start and each generation."""
    out = tmp_path / "run"
    assert main(grpo_args(tiny_model, arith_dir, out, "beta=0.1", "overlong_buffer_len=4", "eval_task=arithmetic",
                          "eval_prompts=4", "eval_every=1", "loss_type=grpo")) == 0
    rows = generations(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["episodes"] == 16
    for r in rows:
        assert all(k in r for k in TRL_METRICS + ["kl", "rewards/arithmetic/mean", "rewards/arithmetic/std",
                                                  "eval/gold_accuracy"]), sorted(r)
        assert r["reward"] < r["rewards/arithmetic/mean"] + 1e-9 and r["completions/clipped_ratio"] > 0
    assert rows[0]["reward"] < 0  # the overlong penalty: lengths 5..8 of at most 8 with a buffer of 4
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # one on-policy step from the reference
    assert read_metrics(out / "metrics.jsonl")[0]["step"] == 0  # gold before training
    assert (out / "final" / "config.json").is_file() and len((out / "samples.jsonl").read_text().splitlines()) == 4


def test_beta_zero_loads_no_reference(tiny_model):
    """beta 0: no reference model is built at all (and none is run); beta > 0: a frozen copy; with LoRA the
    adapter-disabled policy is the reference, so no copy either."""
    tok = load_tokenizer(tiny_model)
    device = torch.device("cpu")
    assert load_models(GRPOConfig(model=str(tiny_model), beta=0.0), tok, device)[1] is None
    _, ref = load_models(GRPOConfig(model=str(tiny_model), beta=0.1), tok, device)
    assert ref is not None and not any(p.requires_grad for p in ref.parameters())
    assert load_models(GRPOConfig(model=str(tiny_model), beta=0.1, lora=LoraConfig(r=4)), tok, device)[1] is None


def sampled(tiny_model, n_prompts=2, g=4, max_new_tokens=6):
    tok = load_tokenizer(tiny_model)
    policy = load_causal_lm(tiny_model, tokenizer=tok)
    cfg = GRPOConfig(num_generations=g)
    cfg.rollout.max_new_tokens = max_new_tokens
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False) for q in ("1+2=?", "30+4=?")[:n_prompts]]
    batch = Sampler(policy, tok, cfg.rollout).generate([list(i) for i in ids], num_samples=g,
                                                       generator=torch.Generator().manual_seed(0))
    return policy, batch


def generation(batch, scores):
    n = len(scores)
    return Generation(batch, torch.tensor(scores), [""] * n, [[{"role": "user", "content": ""}]] * n, {})


def test_experience_keys_scale_rewards_mask_truncated_kl_in_reward(tiny_model):
    """scale_rewards: the advantages are group_advantages of the scores; mask_truncated_completions: the rows with
    no EOS leave the loss mask; kl_in_reward: scores - beta * sum of k1 before the baseline, no KL in the loss."""
    policy, batch = sampled(tiny_model)
    scores = [1.0, 0.0, 0.0, 2.0, 0.5, 0.5, 1.0, 0.0]
    share = RolloutShare(2, 4, None)
    for scale in ("group", "batch", "none"):
        exp, _ = make_experience(GRPOConfig(num_generations=4, scale_rewards=scale), policy, None,
                                 generation(batch, scores), None, share)
        torch.testing.assert_close(exp.advantages, group_advantages(torch.tensor(scores), 4, scale)[0])
        assert exp.ref_logp is None
    truncated = ~batch.ended_with_eos
    assert truncated.any()
    for flag in (False, True):
        exp, _ = make_experience(GRPOConfig(num_generations=4, mask_truncated_completions=flag), policy, None,
                                 generation(batch, scores), None, share)
        keep = ~truncated if flag else torch.ones_like(truncated)
        assert torch.equal(exp.mask, batch.response_mask.bool() & keep[:, None])
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        ref.lm_head.weight.mul_(1.5)
    cfg = GRPOConfig(num_generations=4, beta=0.2, kl_in_reward=True, scale_rewards="none")
    exp, stats = make_experience(cfg, policy, ref, generation(batch, scores), None, share)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        k1 = torch.where(mask, kl_estimate(batch.logprobs, response_logprobs(ref, batch, 1.0), "k1"), 0.0).sum(1)
    expected = group_advantages(torch.tensor(scores) - 0.2 * k1, 4, "none")[0]
    torch.testing.assert_close(exp.advantages, expected)
    assert exp.ref_logp is None and stats["kl"] > 0  # the KL is in the reward, not the loss


@pytest.mark.parametrize("keys", [{"loss_type": "grpo"}, {"loss_type": "dapo"}, {"loss_type": "dr_grpo"},
                                  {"loss_type": "bnpo"}, {"epsilon": 0.05}, {"epsilon": 0.05, "epsilon_high": 0.3},
                                  {"importance_sampling_level": "sequence", "epsilon": 0.05},
                                  {"beta": 0.5, "epsilon": 0.05}])
def test_loss_fn_is_the_pure_functions_on_the_models_log_probs(tiny_model, keys):
    """The recipe's loss fn on real sampled rows, with old log-probs moved off the policy's (so ratios and clips
    are live), equals clipped_surrogate [+ beta * k3] aggregated by `loss_type`, computed from token_logprobs here;
    the keys change the value (each against the defaults)."""
    policy, batch = sampled(tiny_model)
    cfg = GRPOConfig(num_generations=4, **keys)
    cfg.rollout.max_new_tokens = 6
    share = RolloutShare(2, 4, None)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        ref.lm_head.weight.mul_(1.2)
    exp, _ = make_experience(cfg, policy, ref, generation(batch, [1.0, 0.0, 0.0, 2.0, 0.5, 0.5, 1.0, 0.0]), None, share)
    exp.old_logp = exp.old_logp + 0.3 * torch.randn(exp.old_logp.shape, generator=torch.Generator().manual_seed(1))

    def value(c):
        s, stats = grpo_loss_fn(c)(policy, exp)
        return float(s.detach()) / {"dapo": int(exp.mask.sum()), "bnpo": 1}.get(c.loss_type, 8), stats

    got, stats = value(cfg)
    with torch.no_grad():
        logp = response_logprobs(policy, batch, 1.0)
        per_token, _ = clipped_surrogate(logp, exp.old_logp, exp.advantages, exp.mask, epsilon=cfg.epsilon,
                                         epsilon_high=cfg.epsilon_high or None, level=cfg.importance_sampling_level)
        if cfg.beta > 0:
            per_token = per_token + cfg.beta * k3_kl(logp, exp.ref_logp, exp.mask)
        s, n = aggregate(per_token, exp.mask, cfg.loss_type, 6)
    assert got == pytest.approx(float(s) / n, rel=1e-5)
    assert "entropy" in stats and ("kl" in stats) == (cfg.beta > 0)
    default = GRPOConfig(num_generations=4, loss_type=cfg.loss_type)
    default.rollout.max_new_tokens = 6
    if keys != {"loss_type": cfg.loss_type}:
        assert got != pytest.approx(value(default)[0], rel=1e-6)


@pytest.mark.parametrize("keys,steps", [([], 1), (["num_iterations=2"], 2), (["steps_per_generation=2"], 2),
                                        (["num_iterations=2", "steps_per_generation=2"], 4)])
def test_optimizer_steps_per_generation(tiny_model, arith_dir, tmp_path, keys, steps):
    """num_iterations x steps_per_generation optimizer steps per generation. With 2 generations, a linear schedule
    from 1e-3 over T = 2k steps uses 1e-3 * (1 - (k - 1) / 2k) at the last step of the first: 1, 0.75, 0.75, 0.625."""
    out = tmp_path / "run"
    assert main(grpo_args(tiny_model, arith_dir, out, "lr_scheduler=linear", *keys)) == 0
    first = generations(out)[0]
    assert first["learning_rate"] == pytest.approx(1e-3 * (1 - (steps - 1) / (2 * steps)))


def test_dynamic_sampling_draws_more_prompts_up_to_the_cap_and_the_stall_warning(tiny_model, arith_dir, tmp_path,
                                                                                  constant_reward, capsys):
    """A constant reward: every group has zero std. Dynamic sampling drops them all and samples again until
    max_generation_batches = 3 rollout batches of 2 prompts: 6 prompts a generation (2 without it); 3 generations
    at frac_reward_zero_std 1 raise the warning."""
    common = [f"reward.function={constant_reward}:zero", "reward.task=", "total_episodes=24"]
    for flag, per_generation in (("false", 2), ("true", 6)):
        out = tmp_path / flag
        assert main(grpo_args(tiny_model, arith_dir, out, *common, f"dynamic_sampling={flag}",
                              "max_generation_batches=3")) == 0
        rows = generations(out)
        assert [r["prompts_used"] for r in rows] == [per_generation * i for i in (1, 2, 3)]
        assert all(r["frac_reward_zero_std"] == 1.0 for r in rows)
    assert "warning: frac_reward_zero_std >= 1.0 for 3 generations in a row" in capsys.readouterr().out


@pytest.mark.parametrize("bad,key", [(["num_generations=1"], "num_generations"),
                                     (["rollout.batch_size=6"], "rollout.batch_size"),
                                     (["steps_per_generation=3"], "steps_per_generation"),
                                     (["loss_type=drgrpo"], "did you mean `dr_grpo`"),
                                     (["kl_coef=0.1"], "grpo's KL weight is `beta`"),
                                     (["rollout.samples_per_prompt=4"], "`num_generations`"),
                                     (["max_completion_length=8"], "rollout.max_new_tokens"),
                                     (["overlong_buffer_len=8"], "overlong_buffer_len"),
                                     (["strategy=fsdp"], "`strategy` is not accepted")])
def test_bad_config_names_the_key(tiny_model, arith_dir, tmp_path, capsys, bad, key):
    assert main(grpo_args(tiny_model, arith_dir, tmp_path / "bad", *bad)) == 2
    assert key in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_then_resume_equals_uninterrupted(tiny_model, arith_dir, tmp_path, constant_reward):
    """Stop a run with SIGTERM after a generation, resume it with resume=auto: the policy equals the uninterrupted
    run's bit for bit (optimizer, schedule and the prompts consumed by dynamic sampling are restored)."""
    extra = ["total_episodes=48", "beta=0.1", "num_iterations=2", "dynamic_sampling=true", "reward.task=",
             f"reward.function={constant_reward}:length"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(grpo_args(tiny_model, arith_dir, full, *extra)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", *grpo_args(tiny_model, arith_dir, cut, *extra)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((cut / "metrics.jsonl").is_file() and generations(cut)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "saved checkpoint" in out and not (cut / "final").exists()
    assert main(grpo_args(tiny_model, arith_dir, cut, *extra)) == 0
    assert [r["step"] for r in generations(cut)][-1] == 6
    assert generations(full)[-1]["prompts_used"] == generations(cut)[-1]["prompts_used"]
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, arith_dir, tmp_path, constant_reward):
    """torchrun with 2 gloo ranks == 1 process: 2 prompts x 4 completions, each rank samples its prompt's group
    with the one-process uniforms; scale_rewards=batch takes the std over both ranks; 2 optimizer steps per
    generation (num_iterations) over all 8 rows (micro-batches of 2 on each rank), the KL in the loss. Same logged statistics, same final weights up to
    float32 rounding."""
    extra = ["reward.task=", f"reward.function={constant_reward}:length", "scale_rewards=batch", "beta=0.1",
             "num_iterations=2", "batch_size=2", "loss_type=grpo", "dtype=float32"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(grpo_args(tiny_model, arith_dir, one, *extra)) == 0
    run_two_processes(grpo_args(tiny_model, arith_dir, two, *extra))
    rows1, rows2 = generations(one), generations(two)
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2]
    for a, b in zip(rows1, rows2):
        assert a.keys() == b.keys()
        for key in ("completions/mean_length", "completions/min_length", "completions/max_length", "reward",
                    "frac_reward_zero_std"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key  # the same samples
        for key in ("loss", "entropy", "kl", "reward_std", "rewards/function:length/std"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert_same_trained_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")


def test_ppo_loss_agg_mode(tiny_model, arith_dir, tmp_path):
    """ppo's `loss_agg_mode` changes the loss of the same first optimizer step (same rollout, same weights): the
    default dapo is the token mean over the minibatch, dr_grpo the token sum / (max_new_tokens 8 x 8 sequences). Only
    the scale differs, so the gradient norm (measured before clipping) scales by tokens / 64."""
    losses = {}
    for mode in ("dapo", "dr_grpo"):
        out = tmp_path / mode
        assert main(["ppo", f"model={tiny_model}", f"prompts={arith_dir / 'prompts.jsonl'}", f"output_dir={out}",
                     "reward.task=arithmetic", "rollout.batch_size=8", "rollout.max_new_tokens=8", "total_episodes=8",
                     "mini_batch_size=8", "batch_size=8", "ppo_epochs=1", "advantage_estimator=rloo",
                     "rollout.samples_per_prompt=4", "logging.progress=false", f"loss_agg_mode={mode}"]) == 0
        losses[mode] = [r for r in read_metrics(out / "metrics.jsonl") if "objective/kl" in r][0]
    a, b = losses["dapo"], losses["dr_grpo"]
    assert a["objective/scores"] == b["objective/scores"] and a["policy/clipfrac_avg"] == b["policy/clipfrac_avg"]
    tokens = a["rollout/response_length"] * 8
    assert b["grad_norm"] == pytest.approx(a["grad_norm"] * tokens / 64, rel=1e-4)

