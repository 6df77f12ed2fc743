"""GRPO and its family: `posttrain grpo` (Shao et al. 2024, arXiv 2402.03300; DAPO, Yu et al. 2025, arXiv
2503.14476; Dr. GRPO, Liu et al. 2025, arXiv 2503.20783; GSPO, Zheng et al. 2025, arXiv 2507.18071). Critic-free;
TRL's GRPOConfig key names where TRL has one. The math is `losses.grpo`.

One generation = ``rollout.batch_size`` completions; ``total_episodes // rollout.batch_size`` generations:

1. Sample. ``rollout.batch_size / num_generations`` prompts (a seeded order continuing over the run: every prompt
   once per pass), ``num_generations`` completions each at ``rollout.temperature``, cut after the first EOS.
2. Score. The reward source (``reward.*``) scores each completion; DAPO's soft overlong penalty
   (``overlong_buffer_len``, ``overlong_penalty_factor``) is added. ``dynamic_sampling``: a group whose rewards are
   all equal has advantage 0 everywhere and teaches nothing; it is dropped and more prompts are sampled until the
   generation is full, at most ``max_generation_batches`` rollout batches (short of groups then, dropped groups fill
   the rest).
3. Experience, no grad: old log-probs (the sampler's own, as ppo; recomputed under autocast), reference log-probs
   when ``beta > 0``. With ``kl_in_reward``, beta * sum_t k1 is subtracted from each score. Advantage of a completion
   = its reward minus its group's mean, divided by the group's std, the batch's, or nothing (``scale_rewards``),
   the same for every token of it.
4. Optimise: ``num_iterations`` passes over the generation, each ``steps_per_generation`` optimizer steps over
   shuffled slices of ``rollout.batch_size / steps_per_generation`` completions. The shuffle moves whole groups, never
   single completions (so a slice must hold whole groups: ``check_config``), and a micro-batch is ``batch_size``
   completions rounded down to whole groups (at least one group); with ``steps_per_generation`` 1 only the
   micro-batch split differs from shuffling completions. SHARED PROMPTS (``share_prompt_forward``): each group's G
   completions share one prompt, so the training passes (and make_experience's reference / recomputed old
   log-probs) run the prompt once per group and the completions on top of its KV cache
   (`models.forward.shared_prompt_logprobs`): G P - P fewer tokens a group, the same numbers up to float rounding
   (tests/recipes/test_grpo_shared.py). Where that layout is not exact or not supported
   (`models.forward.shared_prompt_unsupported`: the model's own logit forward, sliding-window attention, gradient
   checkpointing, FSDP, attention other than SDPA / eager) every row carries its prompt, as with the key off.
   Per token: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) [+ beta * k3 (clamped as verl), unless
   ``kl_in_reward``], with r per token or one per completion (``importance_sampling_level``). Truncated
   completions leave the loss with ``mask_truncated_completions``.
   NORMALISATION: ``loss_type`` (losses/grpo.py's table), exact over micro-batches and ranks by `engine.train_step`.

Departures from TRL: the old log-probs are always those of the sampling pass (TRL skips them when the update is
on-policy: the ratio is then 1 either way); the run's length is ``total_episodes`` as ppo's; rewards are not clipped
or otherwise changed unless ``reward.clip`` says so. With LoRA the reference is the adapter-disabled base.

Several processes: each rank samples its contiguous share of every rollout batch's prompts (whole groups, so group
baselines stay local) with the uniforms one process would draw for those rows (``engine.dist.RolloutShare``);
batch statistics (``scale_rewards: batch``, the logs) are over all ranks; each optimizer step takes its rows'
share per rank under DDP, normalised by the global count. Without dynamic sampling the result is the one-process
run's up to float rounding (tested with 2 gloo ranks); with it, each rank fills its own share of the groups.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, fields

import torch
from torch import nn

from posttrain.config import ConfigError, GRPOConfig
from posttrain.data import prompt_order
from posttrain.engine import autocast, autocast_dtype, build_optimizer, build_scheduler, grad_scaler, setup_run, train_step, wrap_model
from posttrain.engine.dist import RolloutShare, all_reduce_max
from posttrain.eval.health import print_health
from posttrain.engine.loop import LoopSettings, Steps
from posttrain.losses import (aggregate, aggregate_count, clipped_surrogate, group_advantages, k3_kl, kl_estimate,
                              soft_overlong_penalty)
from posttrain.models import (apply_freeze, apply_lora, disable_dropout, load_causal_lm, load_tokenizer,
                              reference_context, token_logprobs)
from posttrain.models.forward import shared_prompt_logprobs, shared_prompt_unsupported
from posttrain.recipes.common import resume_step, save_final
from posttrain.recipes.prompts import Prompts, gold_metrics, load_inputs, reward_context
from posttrain.rewards import build_reward, prompt_text, score_parts
from posttrain.rollout.sampler import RolloutBatch, Sampler, assemble_batch

# --------------------------------------------------------------------------- set-up


def check_config(cfg: GRPOConfig, world: int = 1) -> None:
    g, r = cfg.num_generations, cfg.rollout
    if r.temperature <= 0:
        raise ConfigError("`rollout.temperature` must be > 0 for grpo (the loss uses the sampling distribution)")
    if g < 2:
        raise ConfigError(f"`num_generations` must be >= 2 (a group baseline needs other samples), got {g}")
    if r.batch_size % (world * g):
        raise ConfigError(f"`rollout.batch_size` ({r.batch_size}) must be a multiple of `num_generations` ({g})"
                          + (f" x {world} processes" if world > 1 else ""))
    if min(cfg.num_iterations, cfg.steps_per_generation, cfg.batch_size, cfg.max_generation_batches) < 1:
        raise ConfigError("`num_iterations`, `steps_per_generation`, `batch_size` and `max_generation_batches` must be >= 1")
    if r.batch_size % (world * cfg.steps_per_generation * g):
        raise ConfigError(f"`rollout.batch_size` ({r.batch_size}) must split into `steps_per_generation` "
                          f"({cfg.steps_per_generation}) equal optimizer steps of whole groups of `num_generations` "
                          f"({g})" + (f" on each of {world} processes" if world > 1 else ""))
    if cfg.total_episodes < r.batch_size:
        raise ConfigError(f"`total_episodes` ({cfg.total_episodes}) is smaller than one generation (`rollout.batch_size` {r.batch_size})")
    if cfg.epsilon <= 0 or cfg.epsilon_high < 0:
        raise ConfigError(f"`epsilon` must be > 0 and `epsilon_high` >= 0, got {cfg.epsilon} and {cfg.epsilon_high}")
    if cfg.beta < 0:
        raise ConfigError(f"`beta` must be >= 0, got {cfg.beta}")
    if not 0 <= cfg.overlong_buffer_len < r.max_new_tokens:
        raise ConfigError(f"`overlong_buffer_len` ({cfg.overlong_buffer_len}) must be in [0, rollout.max_new_tokens)")


def load_models(cfg: GRPOConfig, tok, device) -> tuple[nn.Module, nn.Module | None]:
    """(policy, reference). No reference at all when ``beta`` is 0; with LoRA the reference is the policy with its
    adapter disabled (None here)."""
    policy = disable_dropout(load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, tokenizer=tok,
                                            gradient_checkpointing=cfg.gradient_checkpointing,
                                            attn_implementation=cfg.attn_implementation,
                                            trust_remote_code=cfg.trust_remote_code, keep_float32=True))
    ref = copy.deepcopy(policy).requires_grad_(False).eval() if cfg.beta > 0 and cfg.lora.r <= 0 else None
    return apply_lora(apply_freeze(policy, cfg.freeze), cfg.lora, "causal_lm"), ref


# --------------------------------------------------------------------------- sample and score


def shares_prompt(cfg: GRPOConfig, model) -> bool:
    """Whether the forward passes run each group's prompt once (``share_prompt_forward`` and a model on which that
    layout is exact: `models.forward.shared_prompt_unsupported`); else every completion row carries its prompt."""
    return cfg.share_prompt_forward and shared_prompt_unsupported(model) is None


def response_logprobs(model, batch: RolloutBatch, temperature: float, shared: bool = False) -> torch.Tensor:
    """log pi(response token j) at the sampling temperature, (N, R), with the prompt's positions never projected;
    `shared`: each group's prompt runs once (`models.forward.shared_prompt_logprobs`, the same numbers)."""
    p = batch.prompt_width
    if shared:
        return shared_prompt_logprobs(model, batch.sequences, batch.attention_mask, p, temperature=temperature)
    return token_logprobs(model, batch.sequences, batch.attention_mask, batch.position_ids(), temperature=temperature,
                          start=p - 1)


@dataclass
class Generation:
    """One generation's training rows (N = kept groups x G), and every sampled row's numbers for the logs."""

    batch: RolloutBatch
    scores: torch.Tensor  # (N,) rewards with the overlong penalty
    texts: list[str]
    messages: list
    sampled: dict  # over every sampled row: lengths, truncated, scores, per-function scores, zero-std groups


def sample_generation(cfg: GRPOConfig, sampler: Sampler, reward, tok, prompts: Prompts, prompts_used: int,
                      generator, share: RolloutShare, step: int = 0) -> tuple[Generation, int]:
    """Step 1-2 of the module doc on this rank's share: rollout batches until the generation is full (one without
    dynamic sampling). Returns the generation and the prompts consumed so far."""
    g, per_batch = cfg.num_generations, cfg.rollout.batch_size // cfg.num_generations
    want = share.hi - share.lo  # this rank's groups
    kept, dropped, sampled = [], [], {"lengths": [], "truncated": [], "scores": [], "parts": {}, "zero_std": []}
    for _ in range(cfg.max_generation_batches if cfg.dynamic_sampling else 1):
        chosen = prompts.select(share.take(prompt_order(len(prompts), per_batch, prompts_used, shuffle=cfg.data.shuffle,
                                                        seed=cfg.seed)))
        prompts_used += per_batch
        batch = sampler.generate(chosen.ids, num_samples=g, generator=generator, row_offset=share.row_offset,
                                 total_rows=share.total_rows)
        texts, lengths = batch.texts(tok), batch.response_lengths()
        messages = [chosen.messages[i] for i in batch.prompt_index.tolist()]
        # each reward function sees the prompt rows' other columns, the completion ids and the step (TRL's convention)
        scores, parts = score_parts(reward, messages, texts, **reward_context(chosen, batch, step))
        scores = scores.float()
        scores = scores + soft_overlong_penalty(lengths, cfg.rollout.max_new_tokens, cfg.overlong_buffer_len,
                                                cfg.overlong_penalty_factor)
        _, zero_std = group_advantages(scores, g)  # (N,)
        for name, v in parts.items():
            sampled["parts"].setdefault(name, []).append(v)
        sampled["lengths"].append(lengths.float())
        sampled["truncated"].append((~batch.ended_with_eos).float())
        sampled["scores"].append(scores)
        sampled["zero_std"].append(zero_std[::g].float())
        for k in range(len(chosen)):
            rows = list(range(k * g, (k + 1) * g))
            (dropped if cfg.dynamic_sampling and bool(zero_std[k * g]) else kept).append((batch, rows, scores, texts,
                                                                                          messages))
        if not cfg.dynamic_sampling or share.sum([float(max(0, want - len(kept)))])[0] == 0:
            break
    groups = (kept + dropped)[:want]  # short of groups after the cap: dropped ones (advantage 0) fill the rest
    return assemble_generation(groups, sampler, sampled), prompts_used


def assemble_generation(groups: list, sampler: Sampler, sampled: dict) -> Generation:
    """One RolloutBatch (and scores, texts, messages) of the kept groups' rows, from the rollout batches they came from."""
    prompt_ids, responses, logprobs, scores, texts, messages = [], [], [], [], [], []
    for batch, rows, s, t, m in groups:
        for i in rows:
            n = int(batch.response_mask[i].sum())
            prompt_ids.append(batch.sequences[i, :batch.prompt_width][batch.attention_mask[i, :batch.prompt_width].bool()].tolist())
            responses.append(batch.response_ids[i, :n].tolist())
            logprobs.append(batch.logprobs[i, :n])
            scores.append(float(s[i]))
            texts.append(t[i])
            messages.append(m[i])
    batch = assemble_batch(prompt_ids, responses, logprobs, list(range(len(responses))), eos_id=sampler.eos_id,
                           pad_id=sampler.pad_id)
    return Generation(batch, torch.tensor(scores), texts, messages, sampled)


def sampled_stats(sampled: dict, share: RolloutShare) -> dict:
    """TRL's generation metrics over every sampled row of all ranks (before dynamic sampling drops any)."""
    def mean_std(parts: list) -> tuple[float, float]:
        x = torch.cat(parts).double()
        total, n = share.sum([float(x.sum()), float(x.numel())])
        mean = total / n
        (squares,) = share.sum([float(((x - mean) ** 2).sum())])
        return mean, (squares / (n - 1)) ** 0.5 if n > 1 else 0.0

    lengths = torch.cat(sampled["lengths"])
    longest, shortest = all_reduce_max(torch.stack([lengths.max(), -lengths.min()])).tolist()
    reward_mean, reward_std = mean_std(sampled["scores"])
    stats = {"completions/mean_length": mean_std(sampled["lengths"])[0], "completions/min_length": -shortest,
             "completions/max_length": longest, "completions/clipped_ratio": mean_std(sampled["truncated"])[0],
             "frac_reward_zero_std": mean_std(sampled["zero_std"])[0], "reward": reward_mean, "reward_std": reward_std}
    for name, parts in sampled["parts"].items():
        stats[f"rewards/{name}/mean"], stats[f"rewards/{name}/std"] = mean_std(parts)
    return stats


# --------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """One generation ready for the loss. N rows, P = prompt width, R = response width.

    sequences, attention_mask, position_ids: (N, P+R); mask: (N, R) bool, the tokens in the loss; old_logp,
    ref_logp: (N, R) (ref_logp None without a KL in the loss); advantages: (N,)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None
    advantages: torch.Tensor

    def rows(self, index: torch.Tensor) -> Experience:
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        return Experience(**{k: v[index] if isinstance(v, torch.Tensor) else v for k, v in picked.items()})


def batch_std(scores: torch.Tensor, share: RolloutShare) -> torch.Tensor:
    """The unbiased std of the whole batch's scores (every rank's rows)."""
    total, n = share.sum([float(scores.double().sum()), float(scores.numel())])
    (squares,) = share.sum([float(((scores.double() - total / n) ** 2).sum())])
    return torch.tensor((squares / max(n - 1, 1)) ** 0.5, dtype=scores.dtype)


@torch.no_grad()
def make_experience(cfg: GRPOConfig, policy, ref, gen: Generation, amp, share: RolloutShare) -> tuple[Experience, dict]:
    """Old and reference log-probs, the KL in the reward if asked, group advantages (module doc, step 3)."""
    batch, temp = gen.batch, cfg.rollout.temperature
    response = batch.response_mask.bool()  # (N, R)
    with autocast(amp, batch.sequences.device):
        old_logp = batch.logprobs if amp is None else response_logprobs(policy, batch, temp, shares_prompt(cfg, policy))
        ref_logp = None
        if cfg.beta > 0:
            if ref is not None:
                ref_logp = response_logprobs(ref, batch, temp, shares_prompt(cfg, ref))
            else:
                with reference_context(policy) as base:
                    ref_logp = response_logprobs(base, batch, temp, shares_prompt(cfg, base))
    scores, stats = gen.scores.to(old_logp.device), {}
    if cfg.beta > 0 and cfg.kl_in_reward:
        # k1, whose sum is an unbiased estimate of the sequence KL with an unbiased gradient as a reward term
        kl = torch.where(response, kl_estimate(old_logp, ref_logp, "k1"), torch.zeros_like(old_logp))  # (N, R)
        scores = scores - cfg.beta * kl.sum(1)
        stats["kl"] = share.sum([float(kl.sum())])[0] / max(share.count(response), 1)
    std = batch_std(scores, share) if cfg.scale_rewards == "batch" else None
    advantages, _ = group_advantages(scores, cfg.num_generations, cfg.scale_rewards, std)  # (N,)
    mask = response & (batch.ended_with_eos[:, None] | (not cfg.mask_truncated_completions))
    exp = Experience(batch.sequences, batch.attention_mask, batch.position_ids(), batch.prompt_width, mask, old_logp,
                     ref_logp if not cfg.kl_in_reward else None, advantages)
    return exp, stats


# --------------------------------------------------------------------------- optimisation


def grpo_loss_fn(cfg: GRPOConfig, shared: bool | None = None):
    """loss_fn for train_step: the clipped surrogate [+ beta * k3] per token, aggregated as `loss_type`. `shared`:
    run each group's prompt once (None: `shares_prompt`, decided on the first call's model)."""
    decided: list[bool] = [] if shared is None else [shared]

    def loss_fn(model, mb: Experience):
        if not decided:
            decided.append(shares_prompt(cfg, model))
        if decided[0]:  # the micro-batch's rows are whole groups, each group's rows consecutive
            logp, entropy = shared_prompt_logprobs(model, mb.sequences, mb.attention_mask, mb.prompt_width,
                                                   temperature=cfg.rollout.temperature, return_entropy=True)
        else:
            logp, entropy = token_logprobs(model, mb.sequences, mb.attention_mask, mb.position_ids,
                                           temperature=cfg.rollout.temperature, return_entropy=True,
                                           start=mb.prompt_width - 1)  # (n, R) each
        loss, stats = clipped_surrogate(logp, mb.old_logp, mb.advantages, mb.mask, epsilon=cfg.epsilon,
                                        epsilon_high=cfg.epsilon_high or None, level=cfg.importance_sampling_level)
        n = mb.mask.sum()
        if mb.ref_logp is not None:  # Shao et al. eq. 3: the KL in the loss, not the reward
            kl = k3_kl(logp, mb.ref_logp, mb.mask)  # (n, R)
            loss = loss + cfg.beta * kl
            stats["kl"] = (kl.detach().sum(), n)
        stats["entropy"] = (torch.where(mb.mask, entropy.detach(), torch.zeros_like(entropy)).sum(), n)
        loss_sum, _ = aggregate(loss, mb.mask, cfg.loss_type, cfg.rollout.max_new_tokens)
        return loss_sum, stats
    return loss_fn


def micro_batch_groups(cfg: GRPOConfig) -> int:
    """Groups per micro-batch: `batch_size` completions rounded down to whole groups, at least one."""
    return max(1, cfg.batch_size // cfg.num_generations)


def grpo_update(cfg: GRPOConfig, run, model, exp: Experience, optimizer, scheduler, generator, share: RolloutShare,
                scaler=None) -> dict:
    """num_iterations passes, each steps_per_generation optimizer steps over shuffled slices of the generation's
    groups; micro-batches of `micro_batch_groups` whole groups (module doc, step 4)."""
    loss_fn, amp = grpo_loss_fn(cfg, shares_prompt(cfg, model)), autocast_dtype(cfg, run.device)
    g, sums, steps = cfg.num_generations, {}, 0
    groups = exp.mask.shape[0] // g  # this rank's groups; a group's rows are consecutive
    per_step = share.rows_per_rank(cfg.rollout.batch_size // cfg.steps_per_generation) // g  # groups a step
    per_micro = micro_batch_groups(cfg)
    within = torch.arange(g)
    for _ in range(cfg.num_iterations):
        order = torch.randperm(groups, generator=generator)
        for start in range(0, groups, per_step):
            picked = order[start: start + per_step]
            micro = [exp.rows((picked[i: i + per_micro, None] * g + within).reshape(-1))
                     for i in range(0, len(picked), per_micro)]
            metrics = train_step(model, micro, loss_fn, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm,
                                 dist=run.dist, count_fn=lambda m: aggregate_count(m.mask, cfg.loss_type),
                                 autocast_dtype=amp, scaler=scaler)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
    out = {k: v / steps for k, v in sums.items() if k != "count"}
    out["learning_rate"] = metrics["learning_rate"]
    return out


# --------------------------------------------------------------------------- recipe


class StallWatch:
    """Warns once when a run sits at zero reward std in every group, or at nearly every completion truncated, for
    `patience` generations in a row: the advantages are then (nearly) all 0 and the run is learning nothing."""

    CHECKS = {"frac_reward_zero_std": (1.0, "every group's rewards are equal, so every advantage is 0: the task is "
                                            "too hard or too easy for the policy, or the reward is constant; try "
                                            "dynamic_sampling=true, a larger num_generations, or another reward"),
              "completions/clipped_ratio": (0.9, "nearly every completion hits rollout.max_new_tokens: raise it, or "
                                                 "add overlong_buffer_len / mask_truncated_completions")}

    def __init__(self, patience: int = 3):
        self.patience, self.runs, self.warned = patience, dict.fromkeys(self.CHECKS, 0), set()

    def __call__(self, metrics: dict, write) -> None:
        for key, (limit, advice) in self.CHECKS.items():
            self.runs[key] = self.runs[key] + 1 if metrics.get(key, 0.0) >= limit else 0
            if self.runs[key] >= self.patience and key not in self.warned:
                self.warned.add(key)
                write(f"warning: {key} >= {limit} for {self.patience} generations in a row: {advice}")


def log_generation(run, iterations: Steps, step: int, metrics: dict, gen: Generation, watch: StallWatch) -> dict:
    """metrics.jsonl and two samples every generation; a progress line every `log_every` (logging.steps)."""
    record = run.logger.log(metrics, step=step)
    iterations.show(reward=metrics["reward"], zero_std=metrics["frac_reward_zero_std"])
    watch(metrics, iterations.write)
    if run.dist.is_main:
        with open(run.output_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            for i in range(min(2, len(gen.texts))):
                f.write(json.dumps({"iteration": step, "prompt": prompt_text(gen.messages[i]), "completion": gen.texts[i],
                                    "score": float(gen.scores[i])}) + "\n")
    if iterations.due(iterations.settings.log_every, step):
        shown = {k: round(record[k], 4) for k in ("reward", "frac_reward_zero_std", "completions/mean_length",
                                                  "eval/gold_accuracy") if k in record}
        iterations.write(f"generation {step}: {shown} | {gen.texts[0]!r}")
    return record


def main(cfg: GRPOConfig) -> dict:
    check_config(cfg)
    run = setup_run(cfg, "grpo")
    check_config(cfg, run.dist.world_size)
    device, amp = run.device, autocast_dtype(cfg, run.device)
    tok = load_tokenizer(cfg.model, cfg.data.chat_template, trust_remote_code=cfg.trust_remote_code)
    prompts, task, held_out = load_inputs(cfg, tok)
    policy, ref = load_models(cfg, tok, device)
    reward = build_reward(cfg.reward, device=device, tokenizer=tok, dtype=cfg.dtype,
                          attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    sampler = Sampler(policy, tok, cfg.rollout, amp=amp)
    model = wrap_model(policy, run.dist, "ddp")  # the sampler uses the bare policy
    if run.dist.is_main:
        why = shared_prompt_unsupported(model) if cfg.share_prompt_forward else "share_prompt_forward=false"
        print("forward passes: " + ("each group's prompt once, completions on its KV cache" if why is None
                                    else f"every completion with its prompt ({why})"), flush=True)
    optimizer, scaler = build_optimizer(model, cfg), grad_scaler(amp, device)
    n_generations = cfg.total_episodes // cfg.rollout.batch_size
    scheduler = build_scheduler(optimizer, cfg, n_generations * cfg.num_iterations * cfg.steps_per_generation)

    record: dict = {}
    start, saved = resume_step(run, cfg, policy, optimizer, scheduler, unit="generation")
    prompts_used = int(saved.get("prompts_used", start * (cfg.rollout.batch_size // cfg.num_generations)))
    if scaler is not None and "grad_scaler" in saved:
        scaler.load_state_dict(saved["grad_scaler"])
    if not saved and task is not None:
        run.logger.log({**gold_metrics(cfg, sampler, tok, task, held_out, 0, run.dist), "episodes": 0}, step=0)

    def checkpoint(step: int) -> None:
        scaling = {"grad_scaler": scaler.state_dict()} if scaler is not None else {}
        run.checkpointer.save(step, model=policy, optimizer=optimizer, scheduler=scheduler,
                              extra={"prompts_used": prompts_used, **scaling})

    loop = LoopSettings(total_steps=n_generations, start_step=start, log_every=max(1, cfg.logging.steps),
                        save_every=cfg.save.steps, progress=cfg.logging.progress, desc="grpo", unit="generation")
    iterations, watch = Steps(loop, run.dist, checkpoint), StallWatch()
    share = RolloutShare(cfg.rollout.batch_size // cfg.num_generations, cfg.num_generations, run.dist)
    with iterations:  # a RewardError saves the last completed generation first
        for step in iterations:  # 1-based; generation i draws from (seed, i - 1)
            # one generator per generation for sampling and minibatch order: a resumed run draws the same
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step - 1)
            t0 = time.perf_counter()
            gen, prompts_used = sample_generation(cfg, sampler, reward, tok, prompts, prompts_used, generator, share,
                                                      step - 1)
            gen.batch = gen.batch.to(device)
            exp, exp_stats = make_experience(cfg, policy, ref, gen, amp, share)
            t1 = time.perf_counter()
            train_stats = grpo_update(cfg, run, model, exp, optimizer, scheduler, generator, share, scaler)
            metrics = {**sampled_stats(gen.sampled, share), **train_stats, **exp_stats, "rollout/seconds": t1 - t0,
                       "train/seconds": time.perf_counter() - t1, "episodes": step * cfg.rollout.batch_size,
                       "prompts_used": prompts_used}
            if task is not None and iterations.due(cfg.eval_every, step):
                metrics.update(gold_metrics(cfg, sampler, tok, task, held_out, step, run.dist))
            record = log_generation(run, iterations, step, metrics, gen, watch)
    if not iterations.stopped:
        save_final(run, cfg, policy, tok)
        print_health(run)
    run.close()
    return {"generation": iterations.step, "stopped": iterations.stopped, **record}
