"""A new preference loss end to end: RRHF (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with
Human Feedback without tears", arXiv 2304.05302), the worked example of docs/adding_a_recipe.md.

RRHF scores a response by its length-normalised log-prob p = log pi(y|x) / |y| (eq. 1), puts a hinge on every
pair the scores order wrongly, L_rank = sum over r_i < r_j of max(0, p_i - p_j) (eq. 2), and adds the NLL of the
best response, L_ft = -sum_t log pi(y_best,t | x, y_best,<t) (eq. 3; summed over its tokens, as in the paper).
For a preference pair (k = 2 responses) that is

    loss(pair) = max(0, log pi(y_l|x) / |y_l| - log pi(y_w|x) / |y_w|) - log pi(y_w|x)

No reference model and no beta. Normalisation: a mean over the optimizer step's pairs (the loss fn returns the SUM
over its pairs; `engine.train_step` divides by the global count).

    python examples/rrhf.py examples/dpo_tiny.yaml [key=value ...]   # the `dpo` command's keys
"""

from __future__ import annotations

import sys

import torch

from posttrain.config import ConfigError, DPOConfig, load_config
from posttrain.engine import setup_run
from posttrain.models import disable_dropout, load_causal_lm, load_tokenizer
from posttrain.recipes.common import load_data, prepare_trainable, save_final, train
from posttrain.recipes.dpo import (DPOBatch, collate_dpo, completion_logps, dpo_evaluate, pair_collate,
                                   sequence_tokens)

# the dpo objective's keys: RRHF has none of them, so any set away from its default is refused by name
DPO_ONLY = ("beta", "loss_type", "label_smoothing", "sft_weight", "ref_model", "precompute_ref", "simpo_gamma",
            "cpo_alpha")


def rrhf_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, n_w: torch.Tensor, n_l: torch.Tensor):
    """Per-pair loss (B,), hinge (B,) and NLL (B,) from summed completion log-probs (B,) and token counts (B,)."""
    p_w, p_l = logp_w / n_w.clamp(min=1), logp_l / n_l.clamp(min=1)  # (B,) per-token log-probs, eq. 1
    rank = torch.relu(p_l - p_w)  # (B,) eq. 2 with one pair
    nll = -logp_w  # (B,) eq. 3
    return rank + nll, rank, nll


def rrhf_objective():
    """`loss_fn(model, batch) -> (loss_sum, {name: (sum, count)})`: the one contract of `engine.train_step`."""
    def loss_fn(model, batch: DPOBatch):
        b = batch.num_pairs
        logps, n_tokens = completion_logps(model, batch.pairs)  # (2B,), (2B,): chosen then rejected
        per_pair, rank, nll = rrhf_loss(logps[:b], logps[b:], n_tokens[:b], n_tokens[b:])
        with torch.no_grad():
            ordered = (logps[:b] / n_tokens[:b].clamp(min=1) > logps[b:] / n_tokens[b:].clamp(min=1)).float()
            stats = {"rank_loss": (rank.sum(), b), "nll_loss": (nll.sum(), b), "accuracy": (ordered.sum(), b)}
        return per_pair.sum(), stats
    return loss_fn


def main(cfg: DPOConfig) -> dict:
    defaults = DPOConfig()
    changed = [k for k in DPO_ONLY if getattr(cfg, k) != getattr(defaults, k)]
    if changed:
        raise ConfigError(f"rrhf has no reference model, beta or loss variants: unset {', '.join(changed)}")
    run = setup_run(cfg, "rrhf")
    tok = load_tokenizer(cfg.model, cfg.data.chat_template, trust_remote_code=cfg.trust_remote_code)
    data = load_data(cfg, tok, "preference", verbose=run.dist.is_main)
    model = disable_dropout(load_causal_lm(
        cfg.model, dtype=cfg.dtype, device=run.device, tokenizer=tok, gradient_checkpointing=cfg.gradient_checkpointing,
        keep_float32=cfg.lora.r <= 0, attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code))  # a LoRA base stays frozen in the compute dtype
    run.logger.log(data.summary, step=0)
    model, optimizer, scheduler, _ = prepare_trainable(cfg, run, model, task_type="causal_lm", n_items=len(data.train))
    collate, loss_fn = collate_dpo(tok.pad_token_id, run.device, pair_collate(model)), rrhf_objective()
    evaluate = dpo_evaluate(data.eval, collate, loss_fn, cfg.batch_size, run.dist) if data.eval else None
    result = train(run, cfg, model, optimizer, scheduler, data.train, collate=collate, loss_fn=loss_fn,
                   count_fn=lambda batch: batch.num_pairs, tokens_fn=sequence_tokens, evaluate=evaluate, tokenizer=tok)
    if not result.stopped:
        save_final(run, cfg, model, tok)
    run.close()
    return {"step": result.step, "stopped": result.stopped, **result.last_metrics, **result.eval_metrics}


if __name__ == "__main__":
    args = sys.argv[1:]
    path = args.pop(0) if args and "=" not in args[0] else None
    print(main(load_config(DPOConfig, path, args)))
