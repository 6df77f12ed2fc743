"""Iterative online DPO: `posttrain online-dpo` (DPO-Iter; Xu et al. 2024, arXiv 2404.10719, Sec. 5).

For round r = 1..`rounds`:
  1. take `prompts_per_round` prompts (`prompts`, else `data.train`; the first `data.max_rows` when set; every prompt
     once before any repeats, in a seeded order, or in file order with `data.shuffle: false`);
  2. sample `samples_per_prompt` completions of each from the current policy (`rollout.Sampler`, `rollout.*`);
  3. score them with `reward.*` (reward model, Python function or built-in verifier; a function sees each prompt
     row's other columns, the completion ids and the round), plus `missing_eos_penalty` for a sample that hit
     `rollout.max_new_tokens` without EOS (as ppo: a truncated sample is not scored as if it had finished);
  4. pair the best with the worst completion of each prompt; a prompt whose samples all score the same
     gives no pair (a tie carries no preference);
  5. train offline DPO on the round's pairs for `epochs_per_round` epochs (or `max_steps` steps), with the
     functions of `recipes/dpo.py` — same loss, same normalisation (a mean over the optimizer step's pairs);
  6. with `reset_ref_each_round` (DPO-Iter) the trained policy is the next round's reference.

Reference log-probs: the round's pairs are known before its training starts, so with `precompute_ref`
(default) they are computed in one no-grad pass with the round's reference and cached in the pair items.
The reference of a round is the policy as it starts the round (DPO-Iter; round 1: `ref_model` if set, else the
starting weights), or without `reset_ref_each_round` the initial reference for every round: `ref_model`, the
LoRA base (adapter disabled), or — full fine-tuning — a frozen copy of the starting weights kept in memory.
`precompute_ref: false` keeps the reference as a live model instead (a copy of the policy at the round's start).

Departures from the textbook / choices:
- Each round is one DPO run: a fresh AdamW state and learning-rate schedule (warm-up, decay) per round.
- Several processes: each rank samples and scores a contiguous share of the round's prompts, with the uniforms one
  process would draw for those rows (the sampler's `row_offset`), and caches the reference log-probs of its own
  pairs; the pairs are then gathered in prompt order, so every rank holds the one-process pair list and the DPO
  loop splits it over ranks as usual. The round's stats are over all ranks' samples; the held-out eval is split too.
- Pairs use the sampled token ids as they are (no decode / re-encode round trip); a response that hit
  `rollout.max_new_tokens` without EOS keeps its tokens, with `missing_eos_penalty` in its score.
- Held-out gold reward (`eval_gold_reward`, with `eval_task`): GREEDY decoding on the first `eval_prompts`
  prompts of the task's eval file (`data.eval`, else `eval.jsonl` beside the first prompt file), scored with
  `tasks.get_task(eval_task).verify_batch`; for the arithmetic task this is the accuracy. Before round 1
  (round 0: the starting model) and after every round.

Logged per round (step = optimizer steps so far): `round`, `reward/mean` (all samples, penalty included),
`reward/max` (mean over prompts of the best sample's reward), `rewards/NAME/mean` and `rewards/NAME/std` (each
reward source's own scores), `pairs` (kept), `rollout/eos_rate`, `rollout/response_length`,
`eval_gold_reward`, and the DPO metrics of the round's last optimizer step (`loss`, `rewards/*`, `logps/*`,
`grad_norm`, `learning_rate`); every DPO step is also logged with its `round`.
Checkpoints: `checkpoints/step-N` at the end of each round; `resume: auto` continues at the next round (a round
interrupted part-way is redone from its start).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from posttrain.config import ConfigError, OnlineDPOConfig
from posttrain.data import prompt_order
from posttrain.engine import (autocast_dtype, build_optimizer, build_scheduler, grad_scaler, setup_run, steps_per_epoch,
                              unwrap_parallel, wrap_model)
from posttrain.engine.dist import RolloutShare
from posttrain.eval.health import print_health
from posttrain.engine.loop import BatchPlan, FitResult, LoopSettings, Steps, fit
from posttrain.models import apply_freeze, apply_lora, count_parameters, disable_dropout, load_causal_lm, load_tokenizer
from posttrain.recipes.common import resume_step, save_final
from posttrain.recipes.dpo import (adapter_free_reference, cache_reference, check_config, collate_dpo, dpo_objective,
                                   frozen_reference, sequence_tokens)
from posttrain.recipes.prompts import (Prompts, apply_missing_eos_penalty, check_missing_eos_penalty, gold_accuracy,
                                       load_inputs, reward_context, reward_part_stats)
from posttrain.rewards import build_reward, reward_names, score_parts
from posttrain.rollout.sampler import Sampler

# --------------------------------------------------------------------------- prompts


def round_prompts(prompts: Sequence, cfg: OnlineDPOConfig, r: int) -> list:
    """Round r's prompts: positions (r-1)*n .. r*n-1 of the concatenated seeded epoch orders."""
    n = cfg.prompts_per_round
    return [prompts[i] for i in prompt_order(len(prompts), n, (r - 1) * n, shuffle=cfg.data.shuffle, seed=cfg.seed)]


# --------------------------------------------------------------------------- sample, score, pair


def sample_pairs(sampler: Sampler, tok, reward, prompts: Prompts, k: int, generator, share: RolloutShare, *,
                 missing_eos_penalty: float = 0.0, step: int = 0) -> tuple[list[dict], dict]:
    """Best-vs-worst preference items (token ids) from k scored samples of each of this rank's `share` of `prompts`,
    and the round's sample stats over the whole round. A sample without EOS gets `missing_eos_penalty` added to its
    score; `step` is what a reward function receives as `step`."""
    mine = prompts.select(share.take(list(range(len(prompts)))))
    totals = [0.0] * 7  # sum score, samples, sum of best scores, prompts, eos, tokens, pairs
    pairs, parts = [], {}
    if len(mine):
        pairs, totals, parts = _sample_share(sampler, tok, reward, mine, k, generator, share, missing_eos_penalty, step)
    s, n, best, p, eos, tokens, n_pairs = share.sum(totals)
    stats = {"reward/mean": s / n, "reward/max": best / p, "pairs": int(n_pairs), "rollout/eos_rate": eos / n,
             "rollout/response_length": tokens / n, **reward_part_stats(parts, reward_names(reward), share)}
    return pairs, stats


def _sample_share(sampler, tok, reward, prompts: Prompts, k: int, generator, share: RolloutShare, penalty: float,
                  step: int):
    """(pairs, totals, each reward's own scores) of `sample_pairs` for this rank's prompts."""
    rollout = sampler.generate(prompts.ids, num_samples=k, generator=generator, row_offset=share.row_offset,
                               total_rows=share.total_rows)  # N = P*k rows
    texts = rollout.texts(tok)
    messages = [prompts.messages[i] for i in rollout.prompt_index.tolist()]
    scores, parts = score_parts(reward, messages, texts, **reward_context(prompts, rollout, step))  # (N,)
    scores = apply_missing_eos_penalty(scores.float(), rollout.ended_with_eos, penalty).view(len(prompts), k)  # (P, k)
    lengths = rollout.response_lengths().tolist()  # (N,)
    pairs = []
    for i, prompt_ids in enumerate(prompts.ids):
        best, worst = int(scores[i].argmax()), int(scores[i].argmin())
        if scores[i, best] == scores[i, worst]:
            continue  # a tie: no preference to learn
        chosen, rejected = i * k + best, i * k + worst
        pairs.append({"prompt_ids": prompt_ids,
                      "chosen_ids": rollout.response_ids[chosen, : lengths[chosen]].tolist(),
                      "rejected_ids": rollout.response_ids[rejected, : lengths[rejected]].tolist()})
    totals = [float(scores.double().sum()), float(scores.numel()), float(scores.double().max(dim=1).values.sum()),
              float(len(prompts)), float(rollout.ended_with_eos.sum()), float(rollout.response_lengths().sum()),
              float(len(pairs))]
    return pairs, totals, parts


# --------------------------------------------------------------------------- one round of DPO


def train_round(run, cfg: OnlineDPOConfig, model, tok, pairs: list[dict], reference, r: int, offset: int) -> FitResult:
    """Offline DPO on this round's pairs (reference log-probs cached in the items, or `reference` live): a fresh
    optimizer and schedule, `epochs_per_round` epochs (or `max_steps` steps); logged with the round and the run's
    step count. No checkpoint inside a round: a stopped round is redone from its start."""
    per_epoch = steps_per_epoch(len(pairs), cfg, run.dist.world_size)
    n_steps = int(cfg.max_steps) if int(cfg.max_steps) > 0 else max(1, math.ceil(cfg.epochs_per_round * per_epoch))
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, n_steps)

    def log(metrics: dict, *, step: int, epoch: float | None = None) -> dict:
        return run.logger.log({"round": r, **metrics}, step=offset + step)

    loop = LoopSettings(total_steps=n_steps, log_every=max(1, int(cfg.logging.steps)),
                        progress=bool(cfg.logging.progress), desc=f"online-dpo round {r}")
    plan = BatchPlan(int(cfg.batch_size), int(cfg.grad_accum), per_epoch, int(cfg.seed), bool(cfg.data.shuffle))
    amp = autocast_dtype(cfg, run.device)
    return fit(model, optimizer, scheduler, pairs, loop=loop, plan=plan, dist=run.dist,
               collate=collate_dpo(tok.pad_token_id, run.device), loss_fn=dpo_objective(cfg, reference),
               count_fn=lambda b: b.num_pairs, tokens_fn=sequence_tokens, log=log,
               max_grad_norm=float(cfg.max_grad_norm), autocast_dtype=amp, scaler=grad_scaler(amp, run.device))


def round_reference(cfg: OnlineDPOConfig, r: int, model, initial):
    """Round r's reference: the policy as it starts the round (DPO-Iter), or the initial reference."""
    if initial is not None and (r == 1 or not cfg.reset_ref_each_round):
        return initial
    if cfg.precompute_ref:
        # used before the round's first update: it is the round-start policy. The bare model, not the DDP wrapper:
        # each rank scores its own pairs, a different number of forwards, and a DDP forward is a collective.
        return frozen_reference(unwrap_parallel(model))
    return frozen_reference(copy.deepcopy(unwrap_parallel(model)).requires_grad_(False))


def initial_reference(cfg: OnlineDPOConfig, model, load):
    """`ref_model`; or, when the reference never resets, the starting weights (LoRA base or a frozen copy);
    None when round 1's reference is simply the policy as it starts."""
    if cfg.ref_model:
        return frozen_reference(load(cfg.ref_model).requires_grad_(False))
    if cfg.reset_ref_each_round:
        return None
    if cfg.lora.r > 0:
        return adapter_free_reference(model)
    return frozen_reference(load(cfg.model).requires_grad_(False))


# --------------------------------------------------------------------------- recipe


def check_online_config(cfg: OnlineDPOConfig) -> None:
    check_config(cfg)
    for key in ("rounds", "prompts_per_round", "epochs_per_round"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"`{key}` must be >= 1, got {getattr(cfg, key)}")
    check_missing_eos_penalty(cfg.missing_eos_penalty)
    if cfg.samples_per_prompt < 2:
        raise ConfigError(f"`samples_per_prompt` must be >= 2 to form a pair, got {cfg.samples_per_prompt}")
    if not (cfg.prompts or cfg.data.train):
        raise ConfigError("no prompts: set `prompts` (or data.train) to a prompt file, e.g. a task's prompts.jsonl")


def main(cfg: OnlineDPOConfig) -> dict:
    check_online_config(cfg)
    run = setup_run(cfg, "online-dpo")
    tok = load_tokenizer(cfg.model, cfg.data.chat_template, trust_remote_code=cfg.trust_remote_code)
    device, is_main = run.device, run.dist.is_main
    prompts, task, held_out = load_inputs(cfg, tok)
    reward = build_reward(cfg.reward, device=device, tokenizer=tok, dtype=cfg.dtype,
                          attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
    load = lambda path, keep_float32=True: disable_dropout(load_causal_lm(  # noqa: E731 - a reference: float32
        path, dtype=cfg.dtype, device=device, tokenizer=tok, gradient_checkpointing=cfg.gradient_checkpointing,
        keep_float32=keep_float32, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code))
    model = apply_lora(apply_freeze(load(cfg.model, cfg.lora.r <= 0), cfg.freeze), cfg.lora, "causal_lm")
    trainable, total = count_parameters(model)
    if is_main:
        print(f"prompts: {len(prompts)}; model: {total / 1e6:.2f}M parameters, "
              f"{trainable / 1e6:.2f}M trainable", flush=True)
    step, saved = resume_step(run, cfg, model)  # step: optimizer steps so far
    done = int(saved.get("round", 0))  # rounds already taken
    initial = initial_reference(cfg, model, load)
    model = wrap_model(model, run.dist, "ddp")
    amp = autocast_dtype(cfg, device)
    sampler = Sampler(unwrap_parallel(model), tok, cfg.rollout, amp=amp)
    record: dict = {}
    if task is not None and done == 0:
        record = run.logger.log({"round": 0, "eval_gold_reward": gold_accuracy(sampler, tok, task, held_out, run.dist)[0]},
                                step=0)

    rounds = Steps(LoopSettings(total_steps=cfg.rounds, start_step=done, progress=False, unit="round"), run.dist)
    for r in rounds:
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + r)  # the round's samples: (seed, r) only
        share = RolloutShare(cfg.prompts_per_round, cfg.samples_per_prompt, run.dist)
        chosen = prompts.select(round_prompts(range(len(prompts)), cfg, r))
        pairs, stats = sample_pairs(sampler, tok, reward, chosen, cfg.samples_per_prompt, generator, share,
                                    missing_eos_penalty=cfg.missing_eos_penalty, step=r - 1)
        last: dict = {}
        if stats["pairs"]:
            reference = round_reference(cfg, r, model, initial)
            if cfg.precompute_ref:
                cache_reference(pairs, reference, tok.pad_token_id, device, cfg.batch_size, amp=amp)
            pairs = share.gather(pairs)  # every rank's, in prompt order: the DPO loop splits them over ranks as usual
            result = train_round(run, cfg, model, tok, pairs, None if cfg.precompute_ref else reference, r, step)
            if result.stopped:
                if is_main:
                    print(f"stopped in round {r}; resume=auto redoes it from the end of round {r - 1}", flush=True)
                run.close()
                return {"round": r - 1, "step": step, "stopped": True}
            step += result.step
            last = {k: v for k, v in result.last_metrics.items() if k not in ("step", "epoch", "round")}
        elif is_main:
            print(f"round {r}: every prompt's samples tied; no pairs, no update", flush=True)
        if task is not None:
            stats["eval_gold_reward"] = gold_accuracy(sampler, tok, task, held_out, run.dist)[0]
        record = run.logger.log({"round": r, **stats, **last}, step=step)
        if is_main:
            print(f"round {r}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()), flush=True)
        run.checkpointer.save(step, model=unwrap_parallel(model), extra={"round": r}, tokenizer=tok)
    if rounds.stopped:  # a signal between rounds: the last round's checkpoint is the resume point
        run.close()
        return {"round": rounds.step, "step": step, "stopped": True}

    save_final(run, cfg, model, tok)
    print_health(run)
    run.close()
    return {"round": cfg.rounds, "step": step, "stopped": False,
            **{k: v for k, v in record.items() if k not in ("step", "epoch")}}
