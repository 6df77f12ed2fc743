"""Reward modelling: `posttrain rm`.

A backbone plus a new scalar head (``AutoModelForSequenceClassification``, ``num_labels=1``) scores a
(prompt, response) by the head at the response's last real token, its end-of-turn EOS — the same
token ``rewards.ModelReward`` reads (Ouyang et al. 2022; Huang et al. 2024, arXiv 2403.17031). It is
trained with the Bradley-Terry loss

    loss(pair) = -log sigmoid(r(chosen) - r(rejected) - margin) + center_rewards_coef * (r_c + r_r)^2

with the optional per-pair ``margin`` column (Llama 2; ``margin: false`` ignores it) and the optional
reward-centring term (Eisenstein et al. 2023). Chosen and rejected go through the model in ONE forward
pass, so both see the same weights. On SDPA / eager attention a pair is one row (`data.collate_shared_pairs`:
the prompt and the tokens chosen and rejected start with in common once, rejected masked from chosen), and each
score is read at its completion's last token, whose hidden state has seen exactly its own prompt+completion
row: the same rewards as two separate rows from P + C_w + C_l - S forward tokens instead of 2P + C_w + C_l.
Other attention implementations take `collate_pairs` (rows 0..B-1 chosen, B..2B-1 rejected).

Rankings. A row may rank K responses (best first). As in InstructGPT, all C(K,2) pairs of one prompt
form ONE batch element: the K responses take one forward each and the example's loss is the mean of
its pairs' losses (``losses.ranking_loss``), so a prompt with many responses does not outweigh the
others or overfit (Ouyang et al. 2022, Sec. 3.5). A two-response row is the K = 2 case.

Normalisation. The step's loss is a mean over examples (pairs, or ranked prompts) of the whole
optimizer step: sum over every micro-batch and rank of weight * per-pair loss, where each pair of a
K-way example weighs 1 / C(K,2) (1 for a plain pair), divided by the global number of examples
(``count_fn``, engine/step.py). With pairs only this is the plain mean over pairs. Train statistics
``accuracy`` (r_c > r_r), ``margin`` (r_c - r_r), ``rewards/chosen`` / ``rewards/rejected`` are means
over pairs; ``rewards/mean`` is the mean over scored responses and ``rewards/std`` their std within
each micro-batch, averaged over the step's responses (exact with one micro-batch on one rank).

After training, with ``normalize: true``, the model scores the chosen (best) response of every
training example; their mean and (population) std are stored in the saved config as
``posttrain_reward_bias`` / ``posttrain_reward_scale``, and ``ModelReward`` returns (raw - bias) / scale,
so those rewards have mean 0 and std 1 (the N+ implementation details). The head itself is unchanged,
so ``final/`` also serves as a PPO critic initialisation.
"""

from __future__ import annotations

import math

import torch

from posttrain.config import RMConfig
from posttrain.data import (PairBatch, RankingBatch, SharedPromptPairs, collate_pairs, collate_prompts,
                            collate_rankings, collate_shared_pairs)
from posttrain.engine import setup_run
from posttrain.engine.dist import EvalShare
from posttrain.eval.health import print_health
from posttrain.losses import bradley_terry_loss
from posttrain.models import (load_sequence_classifier, load_tokenizer, sequence_scores, sequence_scores_at,
                              takes_custom_mask)
from posttrain.models import unwrap as base_model
from posttrain.models.forward import attention_name
from posttrain.recipes.common import load_data, prepare_trainable, save_final, train


# --------------------------------------------------------------------------- forward and loss


def pair_rewards(model, batch):
    """One forward over every response of the batch; rewards of each pair's better and worse response.

    batch: a `SharedPromptPairs` (B pairs, B rows), a `PairBatch` (B pairs, 2B rows) or a `RankingBatch` (N
    responses, P pairs). Returns (r_better (P,), r_worse (P,), weight (P,), scores (N,)); weight is 1 / C(K,2) of
    the pair's example, so each example's weights sum to 1.
    """
    if isinstance(batch, SharedPromptPairs):
        scores = sequence_scores_at(model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                    batch.last).float()  # (2B,): chosen then rejected
    else:
        scores = sequence_scores(model, batch.input_ids, batch.attention_mask).float()  # (N,) at the last real token
    if isinstance(batch, (PairBatch, SharedPromptPairs)):
        b = batch.num_pairs
        return scores[:b], scores[b:], torch.ones_like(scores[:b]), scores  # (B,) x 3, (2B,)
    pairs_per_example = torch.bincount(batch.pair_group)  # (G,) = C(K,2) of each example
    weight = 1.0 / pairs_per_example[batch.pair_group].to(scores)  # (P,)
    return scores[batch.pairs[:, 0]], scores[batch.pairs[:, 1]], weight, scores


def num_examples(batch) -> int:
    """The loss's normaliser: pairs of a `PairBatch` / `SharedPromptPairs`, ranked prompts (each counts once) of a
    `RankingBatch`."""
    return int(batch.pair_group.max()) + 1 if isinstance(batch, RankingBatch) else batch.num_pairs


def sequence_tokens(batch) -> int:
    """Tokens of the batch's prompt+completion sequences (a shared prompt counts for each sequence it stands for)."""
    return batch.sequence_tokens if isinstance(batch, SharedPromptPairs) else int(batch.attention_mask.sum())


def weighted_losses(cfg: RMConfig, model, batch):
    """Per-pair weight * Bradley-Terry loss (P,), and the pair rewards (r_c (P,), r_r (P,)) and all scores (N,)."""
    r_c, r_r, weight, scores = pair_rewards(model, batch)
    margin = batch.margin if cfg.margin else None
    per_pair, _ = bradley_terry_loss(r_c, r_r, margin, cfg.center_rewards_coef)  # (P,)
    return weight * per_pair, r_c, r_r, scores


def make_loss(cfg: RMConfig):
    def loss_fn(model, batch):
        """Sum of the weighted pair losses (the engine divides by the step's examples) and (sum, count) stats."""
        losses, r_c, r_r, scores = weighted_losses(cfg, model, batch)
        with torch.no_grad():
            n_pairs, n_scores = r_c.numel(), scores.numel()
            stats = {
                "accuracy": ((r_c > r_r).float().sum(), n_pairs),
                "margin": ((r_c - r_r).sum(), n_pairs),
                "rewards/chosen": (r_c.sum(), n_pairs),
                "rewards/rejected": (r_r.sum(), n_pairs),
                "rewards/mean": (scores.sum(), n_scores),
                "rewards/std": (scores.std(unbiased=False) * n_scores, n_scores),
            }
        return losses.sum(), stats
    return loss_fn


def make_evaluate(items, cfg: RMConfig, collate, dist=None):
    def evaluate(model):
        """Held-out loss (mean over examples, as in training), pair accuracy and margin, reward mean / std."""
        share, loss, examples, chosen, rejected, scores = EvalShare(items, model, dist), 0.0, 0, [], [], []
        for i in range(0, len(share.items), cfg.batch_size):
            batch = collate(share.items[i: i + cfg.batch_size])
            losses, r_c, r_r, s = weighted_losses(cfg, share.model, batch)
            loss += float(losses.sum())
            examples += num_examples(batch)
            chosen, rejected, scores = chosen + r_c.tolist(), rejected + r_r.tolist(), scores + s.tolist()
        loss, examples = share.sum([loss, examples])
        chosen, rejected, scores = (torch.tensor(share.gather(v), dtype=torch.float32) for v in (chosen, rejected, scores))
        return {"eval_loss": loss / max(examples, 1), "eval_accuracy": float((chosen > rejected).float().mean()),
                "eval_margin": float((chosen - rejected).mean()), "eval_rewards/chosen": float(chosen.mean()),
                "eval_rewards/rejected": float(rejected.mean()), "eval_rewards/mean": float(scores.mean()),
                "eval_rewards/std": float(scores.std(unbiased=False))}
    return evaluate


# --------------------------------------------------------------------------- normalisation


@torch.no_grad()
def chosen_rewards(model, items, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Raw rewards (N,) of prompt + chosen (a ranking's best response) for every item."""
    model.eval()
    seqs = [it["prompt_ids"] + (it["response_ids"][0] if "response_ids" in it else it["chosen_ids"]) for it in items]
    out = []
    for i in range(0, len(seqs), batch_size):
        batch = collate_prompts(seqs[i: i + batch_size], pad_id)  # left-padded (B, T)
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        out.append(sequence_scores(model, ids, mask).float().cpu())  # (B,)
    return torch.cat(out)


def chosen_rewards_over_ranks(model, items, pad_id: int, batch_size: int, device, dist) -> torch.Tensor:
    """`chosen_rewards` of every item, each rank scoring its `EvalShare` of them, gathered in item order."""
    share = EvalShare(items, model, dist)
    mine = chosen_rewards(share.model, share.items, pad_id, batch_size, device).tolist() if share.items else []
    return torch.tensor(share.gather(mine), dtype=torch.float32)


def reward_normalisation(rewards: torch.Tensor) -> tuple[float, float]:
    """(bias, scale) = (mean, population std), so (r - bias) / scale has mean 0 and std 1 on these rewards.
    A constant reward (std 0) keeps scale 1: there is nothing to rescale."""
    bias, scale = float(rewards.mean()), float(rewards.std(unbiased=False))
    if not math.isfinite(scale) or scale <= 1e-8:
        print(f"normalize: the chosen rewards have std {scale:.3g}; storing scale 1", flush=True)
        scale = 1.0
    return bias, scale


# --------------------------------------------------------------------------- recipe


def main(cfg: RMConfig) -> dict:
    run = setup_run(cfg, "rm")
    tok = load_tokenizer(cfg.model, cfg.data.chat_template, trust_remote_code=cfg.trust_remote_code)
    device = run.device
    data = load_data(cfg, tok, "preference", verbose=run.dist.is_main)
    model = load_sequence_classifier(cfg.model, num_labels=1, dtype=cfg.dtype, device=device, tokenizer=tok,
                                     gradient_checkpointing=cfg.gradient_checkpointing, keep_float32=cfg.lora.r <= 0,
                                     attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)

    # Pairs only: one row per pair where the attention takes a custom mask, else chosen rows then rejected rows.
    # Any K-way ranking: every item as a ranking.
    rankings = any("response_ids" in it for it in data.train + data.eval)
    shared = takes_custom_mask(model)
    if not (shared or rankings) and run.dist.is_main:
        print(f"pairs: {attention_name(model)} attention (or a sliding window) takes no shared-prompt mask, so each "
              "pair is two rows (the prompt runs once per completion)", flush=True)
    collate_fn = collate_rankings if rankings else collate_shared_pairs if shared else collate_pairs
    collate = lambda group: collate_fn(group, tok.pad_token_id).to(device)  # noqa: E731

    run.logger.log(data.summary, step=0)
    model, optimizer, scheduler, _ = prepare_trainable(cfg, run, model, task_type="seq_cls", n_items=len(data.train))
    result = train(run, cfg, model, optimizer, scheduler, data.train, collate=collate, loss_fn=make_loss(cfg),
                   count_fn=num_examples, tokens_fn=sequence_tokens,
                   evaluate=make_evaluate(data.eval, cfg, collate, run.dist) if data.eval else None, tokenizer=tok)
    norm: dict[str, float] = {}
    if not result.stopped:
        if cfg.normalize:
            bias, scale = reward_normalisation(chosen_rewards_over_ranks(model, data.train, tok.pad_token_id, cfg.batch_size,
                                                                         device, run.dist))
            # The base model's config is what final/ (and final/merged/ with LoRA) writes as config.json.
            base_model(model).config.posttrain_reward_bias = bias
            base_model(model).config.posttrain_reward_scale = scale
            norm = {"normalize/bias": bias, "normalize/scale": scale}
            run.logger.log(norm, step=result.step)
        save_final(run, cfg, model, tok, note=f" (reward bias {norm['normalize/bias']:.4g}, scale "
                                              f"{norm['normalize/scale']:.4g})" if norm else "")
        print_health(run)
    run.close()
    return {"step": result.step, "stopped": result.stopped, **result.last_metrics, **result.eval_metrics, **norm}
