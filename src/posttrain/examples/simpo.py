"""A new preference loss end to end: SimPO (Meng et al. 2024, arXiv 2405.14734), the worked example of
docs/adding_a_recipe.md. For each pair (x, y_w, y_l), with |y| the completion's token count:

    loss(pair) = -log sigmoid(beta * (log pi(y_w|x) / |y_w| - log pi(y_l|x) / |y_l|) - gamma)

No reference model: the length-normalised log-prob is the implicit reward. Normalisation: a mean over the
optimizer step's pairs (the loss fn returns the SUM over its pairs; `engine.train_step` divides by the count).

    python examples/simpo.py examples/dpo_tiny.yaml [gamma=0.5] [key=value ...]   # the `dpo` command's keys
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from posttrain.config import ConfigError, DPOConfig, load_config
from posttrain.engine import setup_run
from posttrain.models import disable_dropout, load_causal_lm, load_tokenizer
from posttrain.recipes.common import load_data, prepare_trainable, save_final, train
from posttrain.recipes.dpo import DPOBatch, collate_dpo, completion_logps, pair_collate, sequence_tokens


def simpo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, n_w: torch.Tensor, n_l: torch.Tensor, *, beta: float,
               gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair loss (B,) and margin (B,) from summed completion log-probs (B,) and token counts (B,). Pure."""
    margin = logp_w / n_w.clamp(min=1) - logp_l / n_l.clamp(min=1)  # (B,) difference of per-token log-probs
    return -F.logsigmoid(beta * margin - gamma), margin


def simpo_objective(beta: float, gamma: float):
    """`loss_fn(model, batch) -> (loss_sum, {name: (sum, count)})`: the one contract of `engine.train_step`."""
    def loss_fn(model, batch: DPOBatch):
        b = batch.num_pairs
        logps, n_tokens = completion_logps(model, batch.pairs)  # (2B,), (2B,): chosen then rejected
        per_pair, margin = simpo_loss(logps[:b], logps[b:], n_tokens[:b], n_tokens[b:], beta=beta, gamma=gamma)
        with torch.no_grad():
            stats = {"margin": (margin.sum(), b), "accuracy": ((margin > 0).float().sum(), b)}
        return per_pair.sum(), stats
    return loss_fn


def main(cfg: DPOConfig, gamma: float = 0.5) -> dict:
    if cfg.ref_model or cfg.sft_weight or cfg.loss_type != "sigmoid":
        raise ConfigError("simpo has no reference model, SFT term or loss variants: unset ref_model, sft_weight, "
                          "loss_type")
    run = setup_run(cfg, "simpo")
    tok = load_tokenizer(cfg.model, cfg.data.chat_template)
    data = load_data(cfg, tok, "preference", verbose=run.dist.is_main)
    model = disable_dropout(load_causal_lm(cfg.model, dtype=cfg.dtype, device=run.device, tokenizer=tok))
    run.logger.log(data.summary, step=0)
    model, optimizer, scheduler, _ = prepare_trainable(cfg, run, model, task_type="causal_lm", n_items=len(data.train))
    result = train(run, cfg, model, optimizer, scheduler, data.train,
                   collate=collate_dpo(tok.pad_token_id, run.device, pair_collate(model)),
                   loss_fn=simpo_objective(cfg.beta, gamma), count_fn=lambda batch: batch.num_pairs,
                   tokens_fn=sequence_tokens, tokenizer=tok)
    if not result.stopped:
        save_final(run, cfg, model, tok)
    run.close()
    return {"step": result.step, "stopped": result.stopped, **result.last_metrics}


if __name__ == "__main__":
    args = sys.argv[1:]
    path = args.pop(0) if args and "=" not in args[0] else None
    gamma = [float(a.split("=", 1)[1]) for a in args if a.startswith("gamma=")]
    print(main(load_config(DPOConfig, path, [a for a in args if not a.startswith("gamma=")]), *gamma))
