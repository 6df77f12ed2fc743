"""PPO for language models: `posttrain ppo` (Ouyang et al. 2022; Huang et al. 2024, arXiv 2403.17031;
Xu et al. 2024, arXiv 2404.10719), and the critic-free estimators GRPO, RLOO and REINFORCE++.

One iteration = ``rollout.batch_size`` episodes; ``total_episodes // rollout.batch_size`` iterations:

1. Rollout. ``rollout.batch_size / samples_per_prompt`` prompts (a seeded order, a function of seed and
   iteration only) rendered with the chat template's generation prompt; the policy samples
   ``samples_per_prompt`` responses each, cut after the first EOS. Dropout is off in every model.
2. Score. The reward source (``reward.*``, clipped to ``reward.clip``) scores the decoded responses;
   ``missing_eos_penalty`` is added for a response with no EOS; ``whiten_rewards`` rescales the scores
   over the batch (std only, the mean is kept so a reward's sign survives — Huang et al.).
3. Experience, no grad, one pass of each model over the whole batch: old log-probs of the policy and
   reference log-probs, both at the sampling temperature (logits / T, as the loss); values from the
   critic (no reference at all when ``kl_coef`` is 0: the objective never reads it, so neither its copy nor its
   pass exists, and ``objective/kl`` is not logged). The old log-probs are the sampler's own (same weights and
   temperature, dropout off; its KV-cached forward agrees with a recomputation to ~1e-6), so the policy is not run again; under autocast, where the
   loss's precision differs from the sampler's, they are recomputed in that one pass instead. Per-token KL estimate (``kl_estimator``); per-token reward = -kl_coef * kl_t plus the score
   at the last response token.
4. Advantages (``advantage_estimator``):
   gae          GAE(gamma, lam) on the per-token rewards with the critic; returns = A + V;
   reinforce_pp returns-to-go of the per-token rewards, always whitened over the batch's tokens;
   rloo         score - kl_coef * sum_t kl_t, minus the mean of the prompt's other samples (one value per
                sequence, whitened over the batch's sequences);
   grpo         group-normalised score; the KL is not in the reward but in the loss (k3, weight kl_coef).
   ``whiten_advantages`` whitens gae advantages over the batch's valid tokens, rloo's over its sequences (grpo and
   reinforce_pp are normalised by definition). Critic-free estimators load no critic at all.
5. Optimise: ``ppo_epochs`` passes over the batch in shuffled minibatches of ``mini_batch_size``
   sequences, each one optimizer step over micro-batches of ``batch_size`` sequences
   (``engine.train_step``). Loss = clipped policy loss (``clip_range``) + vf_coef * clipped value loss
   (``value_clip``) [+ kl_coef * k3 for grpo].
   NORMALISATION (``loss_agg_mode``, default ``dapo``): every per-token term is summed over the valid response
   tokens of the whole minibatch and divided by their count (a token mean over the minibatch, exact across
   micro-batches); ``grpo`` / ``dr_grpo`` / ``bnpo`` aggregate as grpo's ``loss_type`` (``losses.grpo``).
   After each optimizer step with ``ref_ema = eta > 0``: ref <- eta * policy + (1 - eta) * ref.
   The adaptive KL controller (``adaptive_kl_target > 0``) updates kl_coef once per iteration.

Departures from the textbook: the critic has its own learning rate (``critic_learning_rate``) through
its own AdamW parameter group, but actor and critic take ONE joint backward of the summed loss with
one gradient-norm clip over both, as TRL's PolicyAndValueWrapper (Adam is per-parameter, so the
parameter group is a separate critic optimiser in all but the clipping). With LoRA the reference is
the adapter-disabled base (no EMA possible then).

Several processes (``--nproc N`` / torchrun): ``rollout.batch_size`` and ``mini_batch_size`` are global. One
``engine.dist.RolloutShare`` holds all the rank bookkeeping, so the code above reads as one process: each rank
takes a contiguous 1/N of the iteration's prompts (all ``samples_per_prompt`` samples of a prompt on one rank, so
group baselines stay local) and samples them with the uniforms one process would give those rows (the sampler's
``row_offset``); scores, log-probs and values are per rank; every batch statistic (reward and advantage whitening,
the logged means, the adaptive KL's measurement) is over all ranks; each optimizer step takes
``mini_batch_size / N`` of its own rows per rank, and policy and critic are each DistributedDataParallel, with the
loss normalised by the global token count (``engine.train_step``). The result is the one-process run's up to float
rounding when each rank samples in one generation chunk (tested with 2 gloo ranks).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn

from posttrain.config import ConfigError, PPOConfig
from posttrain.data import prompt_order
from posttrain.engine import autocast_dtype, build_scheduler, ema_update, grad_scaler, setup_run, train_step, wrap_model
from posttrain.engine.dist import RolloutShare
from posttrain.eval.health import flat_group_share, print_health
from posttrain.engine.loop import LoopSettings, Steps
from posttrain.engine.optim import adamw, param_groups
from posttrain.losses import (AdaptiveKLController, FixedKLController, aggregate, aggregate_count, gae_advantages,
                              grpo_advantages,
                              kl_estimate, per_token_rewards, policy_loss, reinforce_pp_returns,
                              rloo_advantages, value_loss)
from posttrain.models import (apply_freeze, apply_lora, disable_dropout, load_causal_lm, load_sequence_classifier,
                              load_tokenizer, reference_context, resolve_dtype, save_model, token_logprobs,
                              token_values)
from posttrain.rewards import build_reward, prompt_text, reward_names, score_parts
from posttrain.rewards.model import reward_folder
from posttrain.recipes.common import resume_step, save_final
from posttrain.recipes.prompts import (Prompts, apply_missing_eos_penalty, check_missing_eos_penalty, gold_metrics,
                                       load_inputs, reward_context, reward_part_stats)
from posttrain.rollout.sampler import Sampler

# --------------------------------------------------------------------------- set-up


def check_config(cfg: PPOConfig) -> None:
    r = cfg.rollout
    if r.temperature <= 0:
        raise ConfigError("`rollout.temperature` must be > 0 for PPO (the loss uses the sampling distribution)")
    if r.samples_per_prompt < 1 or r.batch_size % r.samples_per_prompt:
        raise ConfigError(f"`rollout.batch_size` ({r.batch_size}) must be a multiple of `rollout.samples_per_prompt` ({r.samples_per_prompt})")
    if cfg.advantage_estimator in ("grpo", "rloo") and r.samples_per_prompt < 2:
        raise ConfigError(f"`advantage_estimator: {cfg.advantage_estimator}` needs `rollout.samples_per_prompt` >= 2 (a group baseline)")
    if cfg.total_episodes < r.batch_size:
        raise ConfigError(f"`total_episodes` ({cfg.total_episodes}) is smaller than one rollout batch (`rollout.batch_size` {r.batch_size})")
    if min(cfg.ppo_epochs, cfg.mini_batch_size, cfg.batch_size) < 1:
        raise ConfigError("`ppo_epochs`, `mini_batch_size` and `batch_size` must be >= 1")
    if not 0.0 <= cfg.ref_ema <= 1.0:
        raise ConfigError(f"`ref_ema` must be in [0, 1], got {cfg.ref_ema}")
    if cfg.ref_ema > 0 and cfg.lora.r > 0:
        raise ConfigError("`ref_ema` needs full fine-tuning: with LoRA the reference is the frozen base model")
    if cfg.kl_coef == 0 and (cfg.ref_ema > 0 or cfg.adaptive_kl_target > 0):
        key = "ref_ema" if cfg.ref_ema > 0 else "adaptive_kl_target"
        raise ConfigError(f"`{key}` acts on the KL penalty, which `kl_coef: 0` turns off (no reference is used); "
                          f"set kl_coef > 0 or unset {key}")
    check_missing_eos_penalty(cfg.missing_eos_penalty)
    if cfg.kl_estimator != "k1" and cfg.advantage_estimator != "grpo" and (cfg.kl_coef > 0 or cfg.adaptive_kl_target > 0):
        warnings.warn(f"`kl_estimator: {cfg.kl_estimator}` puts {cfg.kl_estimator} in the reward of "
                      f"`advantage_estimator: {cfg.advantage_estimator}`: its expected value is (near) KL(pi||pi_ref), but "
                      "as a reward its policy gradient is biased (only k1's is the gradient of the KL); use kl_estimator=k1",
                      stacklevel=2)


def check_world(cfg: PPOConfig, world: int) -> None:
    """The global batch sizes split evenly over `world` processes (module doc)."""
    r = cfg.rollout
    if r.batch_size % (world * r.samples_per_prompt):
        raise ConfigError(f"`rollout.batch_size` ({r.batch_size}) must split over {world} processes x "
                          f"`rollout.samples_per_prompt` ({r.samples_per_prompt}): a multiple of {world * r.samples_per_prompt}")
    if cfg.mini_batch_size % world:
        raise ConfigError(f"`mini_batch_size` ({cfg.mini_batch_size}) is global: it must be a multiple of the {world} processes")


@dataclass
class Models:
    policy: nn.Module
    ref: nn.Module | None  # None: the LoRA policy with its adapter disabled, or no reference (kl_coef 0)
    critic: nn.Module | None  # None: a critic-free estimator


def load_models(cfg: PPOConfig, tok, device) -> Models:
    keys = {"attn_implementation": cfg.attn_implementation, "trust_remote_code": cfg.trust_remote_code}
    policy = disable_dropout(load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, tokenizer=tok,
                                            gradient_checkpointing=cfg.gradient_checkpointing,
                                            keep_float32=cfg.lora.r <= 0, **keys))  # the EMA reference is a float32 copy
    ref = None
    if cfg.lora.r <= 0 and cfg.kl_coef != 0:
        ref = copy.deepcopy(policy).requires_grad_(False).eval()
    policy = apply_lora(apply_freeze(policy, cfg.freeze), cfg.lora, "causal_lm")
    critic = None
    if cfg.advantage_estimator == "gae":
        init = cfg.critic_init if cfg.critic_init != "auto" else ("reward" if cfg.reward.model else "policy")
        if init == "reward" and not cfg.reward.model:
            raise ConfigError("`critic_init: reward` needs `reward.model`; use critic_init=policy")
        path = reward_folder(cfg.reward.model) if init == "reward" else cfg.model
        vocab = lambda folder: load_tokenizer(folder, trust_remote_code=cfg.trust_remote_code).get_vocab()  # noqa: E731
        if init == "reward" and vocab(path) != vocab(cfg.model):
            raise ConfigError(f"`critic_init: reward`: {path} has a different tokenizer from the policy; use critic_init=policy")
        critic = load_sequence_classifier(path, num_labels=1, dtype=cfg.dtype, device=device, tokenizer=tok,
                                          gradient_checkpointing=cfg.gradient_checkpointing, keep_float32=cfg.lora.r <= 0,
                                          **keys)
        if init == "policy":
            # A new value head starts at V = 0 rather than at random values: the first advantages are then the
            # (whitened) returns themselves, not returns minus noise, until the critic has learned something.
            torch.nn.init.zeros_(critic.score.weight)
        critic = apply_lora(apply_freeze(disable_dropout(critic), cfg.freeze), cfg.lora, "critic")
    return Models(policy, ref, critic)


def build_ppo_optimizer(cfg: PPOConfig, models: Models) -> torch.optim.AdamW:
    """AdamW with the actor's parameter groups at learning_rate and the critic's at critic_learning_rate."""
    groups = param_groups(models.policy, cfg.weight_decay)
    for g in groups:
        g["lr"] = cfg.learning_rate
    if models.critic is not None:
        for g in param_groups(models.critic, cfg.weight_decay):
            groups.append({**g, "lr": cfg.critic_learning_rate or cfg.learning_rate})
    return adamw(groups, cfg.learning_rate)


# --------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """One scored rollout batch. N sequences, P = prompt width, R = response width.

    sequences, attention_mask, position_ids: (N, P+R); mask: (N, R) bool, response tokens through EOS;
    old_logp, ref_logp, advantages: (N, R); values, returns: (N, R), or None without a critic; ref_logp None when
    kl_coef is 0.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor
    values: torch.Tensor | None
    returns: torch.Tensor | None

    def rows(self, index: torch.Tensor) -> Experience:
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v[index] if isinstance(v, torch.Tensor) else v for k, v in picked.items()})


def response_logprobs(model, seqs, attn, pos, p: int, temperature: float) -> torch.Tensor:
    """log pi(response token j) at the sampling temperature, (N, R): position P-1+j predicts token P+j.

    Only the response positions go through the vocabulary projection (`start`); the prompt's hidden states are
    context, never scored."""
    return token_logprobs(model, seqs, attn, pos, temperature=temperature, start=p - 1)


def response_values(critic, seqs, attn, pos, p: int) -> torch.Tensor:
    """V of the state before each response token, (N, R)."""
    return token_values(critic, seqs, attn, pos)[:, p - 1:-1]


def masked_kl(logp, ref_logp, mask, kind: str) -> torch.Tensor:
    """Per-token KL estimate (N, R), 0 on padding (padding never enters the exp)."""
    zero = torch.zeros_like(logp)
    return torch.where(mask, kl_estimate(torch.where(mask, logp, zero), torch.where(mask, ref_logp, zero), kind), zero)


def advantages_for(cfg: PPOConfig, scores, kl, values, mask, kl_coef: float, share: RolloutShare):
    """(advantages (N, R), returns (N, R) or None) for the configured estimator (module doc, step 4), whitened over
    the batch's valid tokens."""
    est, k = cfg.advantage_estimator, cfg.rollout.samples_per_prompt
    returns, whiten = None, cfg.whiten_advantages
    if est == "gae":
        rewards = per_token_rewards(scores, kl, mask, kl_coef)  # (N, R)
        adv, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
    elif est == "reinforce_pp":
        adv, whiten = reinforce_pp_returns(per_token_rewards(scores, kl, mask, kl_coef), mask, cfg.gamma), True
    elif est == "rloo":
        # one advantage per sequence: whitened over the batch's sequences, not its tokens, where a long
        # response would count once per token (Ahmadian et al. 2024 normalise per sample)
        adv = rloo_advantages(scores - kl_coef * kl.sum(1), k)  # (N,)
        if whiten and share.total_rows >= 2:
            adv = share.whiten(adv, torch.ones_like(adv, dtype=torch.bool))
        adv, whiten = adv[:, None].expand_as(kl), False
    else:
        adv, whiten = grpo_advantages(scores, k)[:, None].expand_as(kl), False
    adv = torch.where(mask, adv, torch.zeros_like(adv))
    if whiten and share.count(mask) >= 2:
        adv = share.whiten(adv, mask)
    return adv, returns


@torch.no_grad()
def make_experience(cfg: PPOConfig, models: Models, batch, scores, kl_coef: float, amp, share: RolloutShare,
                    sampled_logp: torch.Tensor | None = None) -> tuple[Experience, dict]:
    """Old / reference log-probs and values in one no-grad pass each (under the loss's autocast, so the
    first ratio is 1); per-token KL; advantages. `sampled_logp` (N, R): the sampler's log-probs, used as the
    old log-probs instead of a policy pass (module doc, step 3). `kl_coef` 0: no reference pass, the KL terms are 0.
    Whitening and stats are the batch's (`share`)."""
    seqs, attn, pos, p = batch.sequences, batch.attention_mask, batch.position_ids(), batch.prompt_width
    mask, temp = batch.response_mask.bool(), cfg.rollout.temperature  # (N, R)
    cast = torch.autocast(seqs.device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    with cast:
        old_logp = sampled_logp if sampled_logp is not None else response_logprobs(models.policy, seqs, attn, pos, p, temp)
        if kl_coef == 0:
            ref_logp = None
        elif models.ref is not None:
            ref_logp = response_logprobs(models.ref, seqs, attn, pos, p, temp)
        else:
            with reference_context(models.policy) as base:
                ref_logp = response_logprobs(base, seqs, attn, pos, p, temp)
        values = response_values(models.critic, seqs, attn, pos, p) if models.critic is not None else None
    kl = masked_kl(old_logp, ref_logp, mask, cfg.kl_estimator) if ref_logp is not None else torch.zeros_like(old_logp)
    adv, returns = advantages_for(cfg, scores, kl, values, mask, kl_coef, share)
    zero = torch.zeros_like(old_logp)
    non_score = (-kl_coef * kl).sum(1)  # (N,)
    stats = {
        **({"objective/kl": float(kl.sum(1).mean())} if ref_logp is not None else {}),
        "objective/entropy": float(torch.where(mask, -old_logp, zero).sum(1).mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((scores + non_score).mean()),
    }
    stats = {**share.mean(stats), "objective/kl_coef": kl_coef}
    exp = Experience(seqs, attn, pos, p, mask, old_logp, ref_logp, adv, values, returns)
    return exp, stats


def rollout_and_score(cfg, sampler, reward, tok, prompts: Prompts, iteration: int, generator, task,
                      share: RolloutShare):
    """Sample a rollout batch and score it (module doc, steps 1-2): this rank's `share` of the batch, with stats
    and whitening over all of it. Returns (batch, scores (N,), samples to show, stats)."""
    k = cfg.rollout.samples_per_prompt
    per_iteration = cfg.rollout.batch_size // k
    chosen = prompts.select(share.take(prompt_order(len(prompts), per_iteration, iteration * per_iteration,
                                                    shuffle=cfg.data.shuffle, seed=cfg.seed)))
    batch = sampler.generate(chosen.ids, num_samples=k, generator=generator, row_offset=share.row_offset,
                             total_rows=share.total_rows)
    texts = batch.texts(tok)
    messages = [chosen.messages[i] for i in batch.prompt_index.tolist()]
    context = reward_context(chosen, batch, iteration)
    scores, parts = score_parts(reward, messages, texts, **context)  # (N,), clipped by the source when reward.clip > 0
    scores = apply_missing_eos_penalty(scores.float(), batch.ended_with_eos, cfg.missing_eos_penalty)
    zero_std = {"frac_reward_zero_std": flat_group_share(scores.view(-1, k).tolist())} if k > 1 else {}  # TRL's name
    stats = {"objective/scores": float(scores.mean()), "val/num_eos_tokens": int(batch.ended_with_eos.sum()),
             "rollout/response_length": float(batch.response_mask.sum(1).mean()), **zero_std}
    if task is not None:
        gold = task.verify_batch([prompt_text(m) for m in messages], texts, context["columns"])
        stats["objective/gold"] = sum(gold) / len(gold)
    stats = share.mean(stats, summed=("val/num_eos_tokens",))
    stats.update(reward_part_stats(parts, reward_names(reward), share))
    if cfg.whiten_rewards and cfg.rollout.batch_size >= 2:
        scores = share.whiten(scores, torch.ones_like(scores, dtype=torch.bool), shift_mean=False)
    samples = [{"prompt": prompt_text(messages[i]), "completion": texts[i], "score": float(scores[i])} for i in range(min(2, len(texts)))]
    return batch, scores, samples, stats


# --------------------------------------------------------------------------- optimisation


def ppo_loss_fn(cfg: PPOConfig, kl_coef: float):
    """loss_fn for train_step: (the per-token loss aggregated as `loss_agg_mode` says, stats as (sum, count))."""
    def loss_fn(model: nn.ModuleDict, mb: Experience):
        args = (mb.sequences, mb.attention_mask, mb.position_ids, mb.prompt_width)
        logp = response_logprobs(model["policy"], *args, cfg.rollout.temperature)  # (n, R)
        loss, stats = policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, cfg.clip_range)  # (n, R)
        if cfg.advantage_estimator == "grpo" and kl_coef != 0:  # Shao et al. 2024 eq. 3: the KL in the loss
            loss = loss + kl_coef * masked_kl(logp, mb.ref_logp, mb.mask, "k3")
        if "critic" in model:
            values = response_values(model["critic"], *args)  # (n, R)
            vloss, vstats = value_loss(values, mb.values, mb.returns, mb.mask, cfg.value_clip)
            loss, stats = loss + cfg.vf_coef * vloss, {**stats, **vstats}
        loss_sum, _ = aggregate(loss, mb.mask, cfg.loss_agg_mode, cfg.rollout.max_new_tokens)
        return loss_sum, stats
    return loss_fn


def ppo_update(cfg, run, trainable, models: Models, exp: Experience, optimizer, scheduler, kl_coef, generator,
               share: RolloutShare, scaler=None) -> dict:
    """ppo_epochs passes over shuffled minibatches; one train_step (+ reference EMA) per minibatch."""
    loss_fn, amp = ppo_loss_fn(cfg, kl_coef), autocast_dtype(cfg, run.device)
    n, sums, steps = exp.mask.shape[0], {}, 0  # this rank's rows
    per_rank = share.rows_per_rank(cfg.mini_batch_size)  # each optimizer step: mini_batch_size rows over all ranks
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, per_rank):
            rows = order[start: start + per_rank]
            micro = [exp.rows(rows[i: i + cfg.batch_size]) for i in range(0, len(rows), cfg.batch_size)]
            metrics = train_step(trainable, micro, loss_fn, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm,
                                 dist=run.dist, count_fn=lambda m: aggregate_count(m.mask, cfg.loss_agg_mode), autocast_dtype=amp, scaler=scaler)
            if cfg.ref_ema > 0:
                ema_update(models.ref, models.policy, cfg.ref_ema)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
    out = {k: v / steps for k, v in sums.items() if k not in ("count", "loss")}
    out["learning_rate"] = metrics["learning_rate"]
    return out


# --------------------------------------------------------------------------- evaluation


evaluate = gold_metrics  # held-out gold accuracy, greedy and sampled at the training temperature (shared with grpo)


# --------------------------------------------------------------------------- recipe


def log_iteration(run, cfg: PPOConfig, iterations: Steps, iteration: int, metrics: dict, samples: list) -> dict:
    """metrics.jsonl and samples.jsonl every iteration; a progress line every `log_every` (logging.steps)."""
    record = run.logger.log(metrics, step=iteration)
    iterations.show(score=metrics["objective/scores"], kl=metrics.get("objective/kl"))
    if run.dist.is_main:
        with open(run.output_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps({"iteration": iteration, **sample}) + "\n")
    if iterations.due(iterations.settings.log_every, iteration):
        shown = {k: round(record[k], 4) for k in ("objective/scores", "objective/kl", "eval/gold_accuracy") if k in record}
        iterations.write(f"iteration {iteration}: {shown} | {samples[0]['completion']!r}")
    return record


def main(cfg: PPOConfig) -> dict:
    check_config(cfg)
    run = setup_run(cfg, "ppo")
    check_world(cfg, run.dist.world_size)
    device, amp = run.device, autocast_dtype(cfg, run.device)
    tok = load_tokenizer(cfg.model, cfg.data.chat_template, trust_remote_code=cfg.trust_remote_code)
    prompts, task, held_out = load_inputs(cfg, tok)
    models = load_models(cfg, tok, device)
    reward = build_reward(cfg.reward, device=device, tokenizer=tok, dtype=cfg.dtype,
                          attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    sampler = Sampler(models.policy, tok, cfg.rollout, amp=amp)

    learners = {"policy": models.policy, **({"critic": models.critic} if models.critic is not None else {})}
    state = nn.ModuleDict({**learners, **({"ref": models.ref} if cfg.ref_ema > 0 else {})})  # what a checkpoint holds
    # each one DistributedDataParallel over several processes (as is, on one); the sampler uses the bare policy
    trainable = nn.ModuleDict({name: wrap_model(m, run.dist, "ddp") for name, m in learners.items()})
    optimizer, scaler = build_ppo_optimizer(cfg, models), grad_scaler(amp, device)
    n_iterations = cfg.total_episodes // cfg.rollout.batch_size
    steps_per_iteration = cfg.ppo_epochs * math.ceil(cfg.rollout.batch_size / cfg.mini_batch_size)
    scheduler = build_scheduler(optimizer, cfg, n_iterations * steps_per_iteration)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.adaptive_kl_target, cfg.adaptive_kl_horizon)
              if cfg.adaptive_kl_target > 0 else FixedKLController(cfg.kl_coef))

    record: dict = {}
    start, saved = resume_step(run, cfg, state, optimizer, scheduler, unit="iteration")
    if saved:
        kl_ctl.value = float(saved["kl_coef"])
        if scaler is not None and "grad_scaler" in saved:
            scaler.load_state_dict(saved["grad_scaler"])
    elif task is not None:
        run.logger.log({**evaluate(cfg, sampler, tok, task, held_out, 0, run.dist), "episodes": 0}, step=0)

    def checkpoint(iteration: int) -> None:
        scaling = {"grad_scaler": scaler.state_dict()} if scaler is not None else {}
        run.checkpointer.save(iteration, model=state, optimizer=optimizer, scheduler=scheduler,
                              extra={"kl_coef": kl_ctl.value, **scaling})

    loop = LoopSettings(total_steps=n_iterations, start_step=start, log_every=max(1, cfg.logging.steps),
                        save_every=cfg.save.steps, progress=cfg.logging.progress, desc="ppo", unit="iteration")
    iterations = Steps(loop, run.dist, checkpoint)
    share = RolloutShare(cfg.rollout.batch_size // cfg.rollout.samples_per_prompt, cfg.rollout.samples_per_prompt,
                         run.dist)  # the same share of every iteration's prompts (`check_world`: equal shares)
    with iterations:  # a RewardError saves the last completed iteration first
        for iteration in iterations:  # 1-based; the rollout of iteration i draws from (seed, i - 1)
            # one generator per iteration for sampling and minibatch order: a resumed run draws the same
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration - 1)
            t0 = time.perf_counter()
            batch, scores, samples, stats = rollout_and_score(cfg, sampler, reward, tok, prompts, iteration - 1, generator,
                                                              task, share)
            batch = batch.to(device)
            exp, exp_stats = make_experience(cfg, models, batch, scores.to(device), kl_ctl.value, amp, share,
                                             sampled_logp=batch.logprobs if amp is None else None)
            t1 = time.perf_counter()
            train_stats = ppo_update(cfg, run, trainable, models, exp, optimizer, scheduler, kl_ctl.value, generator, share,
                                     scaler)
            kl_ctl.update(exp_stats.get("objective/kl", 0.0), cfg.rollout.batch_size)
            metrics = {**stats, **exp_stats, **train_stats, "rollout/seconds": t1 - t0,
                       "train/seconds": time.perf_counter() - t1, "episodes": iteration * cfg.rollout.batch_size}
            if task is not None and iterations.due(cfg.eval_every, iteration):
                metrics.update(evaluate(cfg, sampler, tok, task, held_out, iteration, run.dist))
            record = log_iteration(run, cfg, iterations, iteration, metrics, samples)
    if iterations.stopped:
        run.close()
        return {"iteration": iterations.step, "stopped": True, **record}
    critic, dtype = models.critic, resolve_dtype(cfg.dtype, device)
    save_final(run, cfg, models.policy, tok,  # final/ = the policy's HF folder, final/critic/ = the critic's
               extra=(lambda folder: save_model(critic, folder / "critic", dtype=dtype)) if critic is not None else None)
    print_health(run)
    run.close()
    return {"iteration": iterations.step, "stopped": False, **record}
