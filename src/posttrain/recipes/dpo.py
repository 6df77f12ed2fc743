"""Offline Direct Preference Optimisation: `posttrain dpo` (Rafailov et al. 2023, arXiv 2305.18290).

The algorithm, as in the paper: for each preference pair (x, y_w, y_l) minimise

    -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

(or the IPO / hinge / robust variant of `loss_type`, `losses/dpo.py`), where a sequence log-prob is the SUM
of the token log-probs of the completion tokens only — prompt tokens and padding never count. A batch goes
through the model in one forward with the prompt computed once per pair (`data.collate_shared_pairs`: one row
prompt + chosen + rejected, the rejected tokens masked from the chosen ones and positioned right after the
prompt, so every log-prob is the one of its own prompt + completion row; a prefix that chosen and rejected share
runs once too, as part of the prompt); on attention implementations without custom masks (flash-attention) chosen
and rejected rows go as one concatenated (2B, T) batch (`data.collate_pairs`).

The reference pi_ref is `ref_model` or, by default, the policy's starting weights. How it is computed:

- ``precompute_ref: true`` (default): one no-grad pass over the train and eval pairs before training stores
  `ref_chosen` / `ref_rejected` in each item (cached with the dataset), so training holds one model. With LoRA
  the pass runs before the adapter is added, i.e. on exactly the base model the adapter-disabled policy computes.
- ``precompute_ref: false``: a frozen reference model in memory — `ref_model`, or a copy of the starting
  policy; with LoRA no copy: the policy itself with its adapter disabled (`models.reference_context`).

Reference-free losses (`loss_type` simpo, cpo, orpo; `losses/dpo.py`) score a pair from the policy's own
log-probs: such a run loads no reference model and runs no reference pass (`ref_model` and `precompute_ref` are
refused by the config). simpo and orpo use length-normalised log-probs (sum / completion tokens), as does ipo.

Departures from the textbook:
- ``sft_weight`` > 0 adds sft_weight * NLL(y_w) (the "SFT + DPO" / RPO mix). The NLL is PER PAIR: the token mean
  of the chosen completion's negative log-likelihood, so that the whole loss is one mean over pairs.
- Dropout is switched off in the policy and the reference, so at step 0 the policy equals the reference
  exactly (loss = log 2 for sigmoid) and the implicit rewards carry no dropout noise.

Normalisation: each term is per pair; the optimizer step's loss is the sum over every pair of every
micro-batch on every rank divided by the global number of pairs (`engine.train_step`, count_fn = pairs), so
accumulation and rank split never change it. Logged (TRL's names, means over the step's pairs): `loss`,
`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`,
`nll_loss` (with sft_weight), `grad_norm`, `learning_rate`; on `data.eval` the same with an `eval_` prefix —
`eval_rewards/accuracies` is the preference accuracy of the implicit reward on held-out pairs.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from posttrain.config import ConfigError, DPOConfig
from posttrain.data import PairBatch, SharedPromptPairs, collate_pairs, collate_shared_pairs
from posttrain.data.collate import shared_pair_length
from posttrain.engine import autocast, autocast_dtype, contiguous_share, setup_run
from posttrain.engine.dist import EvalShare, gather_lists
from posttrain.eval.health import print_health
from posttrain.losses.dpo import REFERENCE_FREE_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, simpo_loss
from posttrain.models import (disable_dropout, load_causal_lm, load_tokenizer, reference_context,
                              takes_custom_mask, token_logprobs, token_logprobs_at)
from posttrain.models.forward import attention_name
from posttrain.recipes.common import load_data, prepare_trainable, save_final, train

Pairs = PairBatch | SharedPromptPairs
Reference = Callable[[Pairs], torch.Tensor]  # pairs -> (2B,) reference sequence log-probs, no grad


# --------------------------------------------------------------------------- sequence log-probs


def pair_collate(model) -> Callable[[list[dict], int], Pairs]:
    """collate_shared_pairs where a custom mask gives each token its own row's context (`takes_custom_mask`),
    else collate_pairs."""
    return collate_shared_pairs if takes_custom_mask(model) else collate_pairs


def completion_logps(model, pairs: Pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion-token log-probs per completion, (2B,) chosen then rejected, and their token counts, (2B,)."""
    if isinstance(pairs, SharedPromptPairs):
        logp = token_logprobs_at(model, pairs.input_ids, pairs.attention_mask, pairs.position_ids, pairs.source,
                                 pairs.targets)  # (2B, C)
        mask = pairs.target_mask.bool()  # (2B, C)
        return torch.where(mask, logp, 0.0).sum(-1), mask.sum(-1)  # (2B,), (2B,)
    logp = token_logprobs(model, pairs.input_ids, pairs.attention_mask, pairs.position_ids)  # (2B, T-1)
    mask = pairs.completion_mask.bool()  # (2B, T-1): target t+1 is a completion token
    # where, not multiply: a pad position's value is whatever the model computed there (even non-finite)
    return torch.where(mask, logp, 0.0).sum(-1), mask.sum(-1)  # (2B,), (2B,)


def frozen_reference(model) -> Reference:
    """A model that is not trained (a separate copy, or the policy before training starts)."""
    def reference(pairs: PairBatch) -> torch.Tensor:
        with torch.no_grad():
            return completion_logps(model, pairs)[0]
    return reference


def adapter_free_reference(model) -> Reference:
    """The LoRA policy with its adapter disabled: the base model, with no second copy in memory."""
    def reference(pairs: PairBatch) -> torch.Tensor:
        with torch.no_grad(), reference_context(model) as base:
            return completion_logps(base, pairs)[0]
    return reference


def cache_reference(items: list[dict], reference: Reference, pad_id: int, device, batch_size: int,
                    collate=collate_pairs, amp: torch.dtype | None = None) -> None:
    """Store `ref_chosen` / `ref_rejected` (floats) in every item: one no-grad pass, under the autocast `amp` the
    training forward runs under (`engine.autocast_dtype`), so the first loss compares like with like (log 2).

    The items go in order of their row length: each value depends on its own pair only, so the order is free, and
    batches of like lengths hold little padding."""
    items = sorted(items, key=shared_pair_length)
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        with autocast(amp, torch.device(device)):
            ref = reference(collate(chunk, pad_id).to(device)).float().cpu()  # (2B,)
        for k, item in enumerate(chunk):
            item["ref_chosen"], item["ref_rejected"] = float(ref[k]), float(ref[len(chunk) + k])


def cache_reference_over_ranks(items: list[dict], reference: Reference, pad_id: int, device, batch_size: int, collate,
                               dist, amp: torch.dtype | None = None) -> None:
    """`cache_reference` with the items split over the ranks (contiguous shares) and the values gathered: every rank
    ends with every item's reference log-probs after running 1/N of the pass (each rank running all of it would make
    the reference pass, not training, the cost that stops shrinking with more GPUs)."""
    lo, hi = contiguous_share(len(items), dist)
    cache_reference(items[lo:hi], reference, pad_id, device, batch_size, collate, amp)
    if dist.distributed:
        mine = [(item["ref_chosen"], item["ref_rejected"]) for item in items[lo:hi]]
        for item, (chosen, rejected) in zip(items, gather_lists(mine), strict=True):  # rank order = item order
            item["ref_chosen"], item["ref_rejected"] = chosen, rejected


# --------------------------------------------------------------------------- batches and loss


@dataclass
class DPOBatch:
    """pairs: a SharedPromptPairs or PairBatch (chosen then rejected); ref_logps (2B,) cached reference log-probs or None."""

    pairs: Pairs
    ref_logps: torch.Tensor | None

    @property
    def num_pairs(self) -> int:
        return self.pairs.num_pairs

    def to(self, device) -> "DPOBatch":
        return DPOBatch(self.pairs.to(device), None if self.ref_logps is None else self.ref_logps.to(device))


def collate_dpo(pad_id: int, device, pairs=collate_pairs) -> Callable[[list[dict]], DPOBatch]:
    def collate(items: list[dict]) -> DPOBatch:
        ref = None
        if all("ref_chosen" in it for it in items):
            ref = torch.tensor([it["ref_chosen"] for it in items] + [it["ref_rejected"] for it in items])  # (2B,)
        return DPOBatch(pairs(items, pad_id), ref).to(device)
    return collate


def reference_free(cfg) -> bool:
    return cfg.loss_type in REFERENCE_FREE_LOSS_TYPES


def pair_loss(cfg, logps: torch.Tensor, n_tokens: torch.Tensor, ref: torch.Tensor | None):
    """`loss_type`'s per-pair loss (B,) and stats from (2B,) sequence log-probs and token counts, chosen then
    rejected, and the (2B,) reference log-probs (None for a reference-free loss)."""
    b = logps.shape[0] // 2
    chosen, rejected, n_chosen, n_rejected = logps[:b], logps[b:], n_tokens[:b], n_tokens[b:]
    if cfg.loss_type == "simpo":
        return simpo_loss(chosen, rejected, n_chosen, n_rejected, beta=cfg.beta, gamma=cfg.simpo_gamma,
                          label_smoothing=cfg.label_smoothing)
    if cfg.loss_type == "cpo":
        return cpo_loss(chosen, rejected, n_chosen, beta=cfg.beta, alpha=cfg.cpo_alpha,
                        label_smoothing=cfg.label_smoothing)
    if cfg.loss_type == "orpo":
        return orpo_loss(chosen, rejected, n_chosen, n_rejected, beta=cfg.beta)
    ref = ref.to(logps.dtype)
    return dpo_loss(chosen, rejected, ref[:b], ref[b:], beta=cfg.beta, loss_type=cfg.loss_type,
                    label_smoothing=cfg.label_smoothing, chosen_tokens=n_chosen, rejected_tokens=n_rejected)


def dpo_objective(cfg: DPOConfig, reference: Reference | None = None):
    """`loss_fn(model, batch) -> (sum of per-pair losses, stats as sums over pairs)` for `engine.train_step`.

    The reference log-probs come from the batch when cached, else from `reference`; a reference-free loss uses
    none."""
    def loss_fn(model, batch: DPOBatch):
        b = batch.num_pairs
        logps, n_tokens = completion_logps(model, batch.pairs)  # (2B,), (2B,)
        ref = None
        if not reference_free(cfg):
            ref = batch.ref_logps if batch.ref_logps is not None else reference(batch.pairs)  # (2B,)
        per_pair, stats = pair_loss(cfg, logps, n_tokens, ref)  # (B,)
        if cfg.sft_weight:
            nll = -logps[:b] / n_tokens[:b].clamp(min=1)  # (B,) token-mean NLL of each chosen completion
            per_pair = per_pair + cfg.sft_weight * nll
            stats["nll_loss"] = (nll.detach().sum(), b)
        return per_pair.sum(), stats
    return loss_fn


def sequence_tokens(batch: DPOBatch) -> int:
    """Tokens of the batch's 2B prompt+completion sequences (a shared prompt counts for both, as it stands for both)."""
    pairs = batch.pairs
    return pairs.sequence_tokens if isinstance(pairs, SharedPromptPairs) else int(pairs.attention_mask.sum())


def dpo_evaluate(items: list[dict], collate, loss_fn, batch_size: int, dist=None):
    """Mean loss and DPO metrics over the held-out pairs, prefixed `eval_`."""
    def evaluate(model) -> dict[str, float]:
        share, sums = EvalShare(items, model, dist), {}
        for i in range(0, len(share.items), batch_size):
            loss_sum, stats = loss_fn(share.model, collate(share.items[i: i + batch_size]))
            for k, v in {"loss": loss_sum, **{k: total for k, (total, _) in stats.items()}}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        names = sorted(set(share.gather(sorted(sums))))  # a rank with no held-out pair has no keys of its own
        totals = share.sum([sums.get(k, 0.0) for k in names])
        return {f"eval_{k}": v / max(len(items), 1) for k, v in zip(names, totals)}
    return evaluate


def check_config(cfg: DPOConfig) -> None:
    if cfg.beta <= 0:
        raise ConfigError(f"`beta` must be > 0, got {cfg.beta}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"`label_smoothing` must be in [0, 0.5), got {cfg.label_smoothing}")
    if cfg.sft_weight < 0:
        raise ConfigError(f"`sft_weight` must be >= 0, got {cfg.sft_weight}")
    if reference_free(cfg) and cfg.ref_model:
        raise ConfigError(f"`ref_model` does not apply with loss_type={cfg.loss_type}: a reference-free loss uses no "
                          "reference model")
    if getattr(cfg, "cpo_alpha", 0.0) < 0:
        raise ConfigError(f"`cpo_alpha` must be >= 0, got {cfg.cpo_alpha}")


# --------------------------------------------------------------------------- recipe


def main(cfg: DPOConfig) -> dict:
    check_config(cfg)
    run = setup_run(cfg, "dpo")
    tok = load_tokenizer(cfg.model, cfg.data.chat_template, trust_remote_code=cfg.trust_remote_code)
    device, pad_id = run.device, tok.pad_token_id
    data = load_data(cfg, tok, "preference", verbose=run.dist.is_main)
    load = lambda path, keep_float32: disable_dropout(load_causal_lm(  # noqa: E731
        path, dtype=cfg.dtype, device=device, tokenizer=tok, gradient_checkpointing=cfg.gradient_checkpointing,
        keep_float32=keep_float32, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code))
    model = load(cfg.model, cfg.lora.r <= 0)  # a LoRA base stays frozen in the compute dtype
    ref_model = load(cfg.ref_model, True).requires_grad_(False).eval() if cfg.ref_model else None
    needs_reference = not reference_free(cfg)
    if not takes_custom_mask(model) and run.dist.is_main:
        print(f"pairs: {attention_name(model)} attention (or a sliding window) takes no shared-prompt mask, so each "
              "pair is two rows (the prompt runs once per completion)", flush=True)

    if needs_reference and cfg.precompute_ref:
        t0 = time.perf_counter()
        # the policy before training (and before LoRA) is the starting weights, i.e. the LoRA base; twice the
        # training rows a forward: no activations are kept for a backward
        cache_reference_over_ranks(data.train + data.eval, frozen_reference(ref_model or model), pad_id, device,
                                   2 * cfg.batch_size, pair_collate(ref_model or model), run.dist,
                                   autocast_dtype(cfg, device))
        ref_model = None
        if run.dist.is_main:
            print(f"reference log-probs cached for {len(data.train) + len(data.eval)} pairs in "
                  f"{time.perf_counter() - t0:.2f} s",
                  flush=True)
    elif needs_reference and ref_model is None and cfg.lora.r <= 0:
        ref_model = copy.deepcopy(model).requires_grad_(False).eval()

    run.logger.log(data.summary, step=0)
    model, optimizer, scheduler, _ = prepare_trainable(cfg, run, model, task_type="causal_lm", n_items=len(data.train))
    reference = None
    if needs_reference and not cfg.precompute_ref:
        reference = frozen_reference(ref_model) if ref_model is not None else adapter_free_reference(model)
    collate = collate_dpo(pad_id, device, pair_collate(model))
    loss_fn = dpo_objective(cfg, reference)
    evaluate = dpo_evaluate(data.eval, collate, loss_fn, cfg.batch_size, run.dist) if data.eval else None
    result = train(run, cfg, model, optimizer, scheduler, data.train, collate=collate, loss_fn=loss_fn,
                   count_fn=lambda b: b.num_pairs, tokens_fn=sequence_tokens, evaluate=evaluate, tokenizer=tok)
    if not result.stopped:
        save_final(run, cfg, model, tok)
        print_health(run)
    run.close()
    return {"step": result.step, "stopped": result.stopped, **result.last_metrics, **result.eval_metrics}
