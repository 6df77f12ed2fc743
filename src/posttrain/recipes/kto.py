"""Kahneman-Tversky Optimisation: `posttrain kto` (Ethayarajh et al. 2024, arXiv 2402.01306).

The algorithm, as in the paper: each row is a prompt x, ONE completion y and a label (desirable or not); with
r(x, y) = log pi(y|x) - log pi_ref(y|x) (sequence log-probs, summed over the completion tokens) minimise

    desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z0)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

(`losses/kto.py`). Preference rows (prompt, chosen, rejected) are unpaired: one desirable and one undesirable row.

The reference point z0 estimates KL(pi || pi_ref) from mismatched pairs (x, y'): y' is the completion of another
row. Which row is fixed once, before training (a seeded shuffle, each row taking the next row's completion, a row
of another prompt where one is near), so the reference log-probs of the mismatched pairs are cached like those of
the rows themselves. z0 = max(0, mean of r(x, y') over EVERY row of the optimizer step: all micro-batches, all
ranks), computed without gradient in a pass before the step (`fit`'s `prepare`) and shared by all its
micro-batches. So accumulation and rank split never change it (the paper and TRL take the mean over one
micro-batch on each rank, which makes z0 depend on batch_size and grad_accum). On `data.eval`, z0 is the mean over
the whole held-out set.

The reference pi_ref is `ref_model` or the policy's starting weights (the LoRA base with LoRA); its log-probs of
every row and every mismatched pair are computed in one no-grad pass before training and cached, so training
holds one model. Dropout is off in the policy, so at step 0 r = 0, z0 = 0 and every row's loss is its weight / 2.

Normalisation: one loss per row; the step's loss is the sum over every row of every micro-batch on every rank
divided by the global number of rows (`engine.train_step`, count_fn = rows). Logged (TRL's names): `loss`,
`rewards/chosen` / `rewards/rejected` (beta * r, means over the step's desirable / undesirable rows),
`logps/chosen`, `logps/rejected`, `kl` (z0), `grad_norm`, `learning_rate`; `eval_` the same on held-out rows.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import torch

from posttrain.config import ConfigError, KTOConfig
from posttrain.data import IGNORE, SFTBatch, collate_sft
from posttrain.engine import all_reduce_sum, autocast, autocast_dtype, contiguous_share, setup_run
from posttrain.engine.dist import EvalShare, gather_lists
from posttrain.eval.health import print_health
from posttrain.losses.kto import kl_sum, kto_loss, reference_point
from posttrain.models import disable_dropout, load_causal_lm, load_tokenizer, token_logprobs
from posttrain.recipes.common import load_data, prepare_trainable, save_final, train

# the paper's advice (Sec. 4.2): desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]
BALANCE = (1.0, 4 / 3)


# --------------------------------------------------------------------------- rows


def unpair(items: list[dict]) -> list[dict]:
    """Tokenized items as unpaired rows: a preference pair gives its chosen completion (desirable) and its rejected
    one (undesirable); an unpaired row stays as it is."""
    out = []
    for it in items:
        if "chosen_ids" in it:
            out.append({"prompt_ids": it["prompt_ids"], "completion_ids": it["chosen_ids"], "desirable": True})
            out.append({"prompt_ids": it["prompt_ids"], "completion_ids": it["rejected_ids"], "desirable": False})
        else:
            out.append(it)
    return out


def assign_mismatched(items: list[dict], seed: int, max_length: int, tries: int = 8) -> None:
    """Give every row `kl_ids`: the completion of another row, the mismatched pair z0 is estimated from. A seeded
    shuffle, each row taking the completion of the next (or, when that one has the same prompt, of the first of the
    following `tries` that does not), cut to fit max_length after the row's prompt."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    for k, i in enumerate(order):
        ahead = [order[(k + s) % len(order)] for s in range(1, min(tries, len(order) - 1) + 1)] or [i]
        j = next((j for j in ahead if items[j]["prompt_ids"] != items[i]["prompt_ids"]), ahead[0])
        room = max(1, max_length - len(items[i]["prompt_ids"]))
        items[i]["kl_ids"] = items[j]["completion_ids"][:room]


def completion_rows(items: list[dict], key: str, pad_id: int) -> SFTBatch:
    """prompt + `key` completion per item, (B, T), labels on the completion tokens only."""
    return collate_sft([{"input_ids": list(it["prompt_ids"]) + list(it[key]),
                         "labels": [IGNORE] * len(it["prompt_ids"]) + list(it[key])} for it in items], pad_id)


def sequence_logps(model, rows: SFTBatch) -> torch.Tensor:
    """Sum of the completion tokens' log-probs per row, (B,)."""
    logp = token_logprobs(model, rows.input_ids, rows.attention_mask, rows.position_ids)  # (B, T-1)
    mask = rows.labels[:, 1:] != IGNORE  # (B, T-1): target t+1 is a completion token
    return torch.where(mask, logp, 0.0).sum(-1)  # (B,)


def cache_reference(items: list[dict], ref_model, pad_id: int, device, batch_size: int, dist,
                    amp: torch.dtype | None) -> None:
    """Store `ref_logp` and `ref_kl_logp` in every item: one no-grad pass of the reference, 1/N of the items per
    rank (contiguous shares), gathered so every rank holds them all."""
    lo, hi = contiguous_share(len(items), dist)
    mine = sorted(items[lo:hi], key=lambda it: len(it["prompt_ids"]) + len(it["completion_ids"]))
    for i in range(0, len(mine), batch_size):
        chunk = mine[i: i + batch_size]
        with torch.no_grad(), autocast(amp, torch.device(device)):
            ref = sequence_logps(ref_model, completion_rows(chunk, "completion_ids", pad_id).to(device)).float().cpu()
            ref_kl = sequence_logps(ref_model, completion_rows(chunk, "kl_ids", pad_id).to(device)).float().cpu()
        for k, it in enumerate(chunk):
            it["ref_logp"], it["ref_kl_logp"] = float(ref[k]), float(ref_kl[k])
    if dist.distributed:
        values = gather_lists([(it["ref_logp"], it["ref_kl_logp"]) for it in items[lo:hi]])  # rank order = item order
        for it, (ref, ref_kl) in zip(items, values, strict=True):
            it["ref_logp"], it["ref_kl_logp"] = ref, ref_kl


# --------------------------------------------------------------------------- batches and loss


@dataclass
class KTOBatch:
    """completions (B, T): prompt + the row's completion; mismatched (B, T'): prompt + another row's completion;
    desirable (B,) bool; ref_logps, ref_kl_logps (B,) cached reference log-probs of both; z0 the step's reference
    point (0-d, set by `step_reference_point` before the step)."""

    completions: SFTBatch
    mismatched: SFTBatch
    desirable: torch.Tensor
    ref_logps: torch.Tensor
    ref_kl_logps: torch.Tensor
    z0: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.desirable.shape[0]

    def to(self, device) -> "KTOBatch":
        return KTOBatch(self.completions.to(device), self.mismatched.to(device), self.desirable.to(device),
                        self.ref_logps.to(device), self.ref_kl_logps.to(device),
                        None if self.z0 is None else self.z0.to(device))


def collate_kto(pad_id: int, device):
    def collate(items: list[dict]) -> KTOBatch:
        return KTOBatch(completion_rows(items, "completion_ids", pad_id), completion_rows(items, "kl_ids", pad_id),
                        torch.tensor([bool(it["desirable"]) for it in items]),
                        torch.tensor([it["ref_logp"] for it in items]),
                        torch.tensor([it["ref_kl_logp"] for it in items])).to(device)
    return collate


def step_reference_point(dist):
    """`fit`'s `prepare`: z0 over the step's rows on every rank (module doc), set in each micro-batch."""
    def prepare(model, micro: list[KTOBatch]) -> list[KTOBatch]:
        total, count = 0.0, 0
        for batch in micro:
            s, n = kl_sum(sequence_logps(model, batch.mismatched), batch.ref_kl_logps)
            total, count = total + float(s), count + n
        total, count = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=dist.device)).tolist()
        z0 = reference_point(total, count)
        return [dataclasses.replace(batch, z0=z0) for batch in micro]
    return prepare


def kto_objective(cfg: KTOConfig):
    """`loss_fn(model, batch) -> (sum of per-row losses, stats)` for `engine.train_step`."""
    def loss_fn(model, batch: KTOBatch):
        logps = sequence_logps(model, batch.completions)  # (B,)
        per_row, stats = kto_loss(logps, batch.ref_logps, batch.desirable, batch.z0, beta=cfg.beta,
                                  desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
        return per_row.sum(), stats
    return loss_fn


def sequence_tokens(batch: KTOBatch) -> int:
    """Tokens of the rows and of their mismatched pairs: both go through the model each step."""
    return int(batch.completions.attention_mask.sum()) + int(batch.mismatched.attention_mask.sum())


def kto_evaluate(items: list[dict], collate, loss_fn, batch_size: int, dist=None):
    """Mean loss and KTO metrics over the held-out rows, prefixed `eval_`; z0 over the whole held-out set."""
    def evaluate(model) -> dict[str, float]:
        share = EvalShare(items, model, dist)
        batches = [collate(share.items[i: i + batch_size]) for i in range(0, len(share.items), batch_size)]
        parts = [kl_sum(sequence_logps(share.model, b.mismatched), b.ref_kl_logps) for b in batches]
        total, count = share.sum([sum(float(s) for s, _ in parts), float(sum(n for _, n in parts))])
        z0 = reference_point(total, count)
        sums: dict[str, list[float]] = {}
        for b in batches:
            loss_sum, stats = loss_fn(share.model, dataclasses.replace(b, z0=z0.to(b.desirable.device)))
            for k, (s, n) in {"loss": (loss_sum, b.num_rows), **stats}.items():
                acc = sums.setdefault(k, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + float(s), acc[1] + float(n)
        names = sorted(set(share.gather(sorted(sums))))  # a rank with no held-out row has no keys of its own
        totals = share.sum([v for k in names for v in sums.get(k, [0.0, 0.0])])
        return {f"eval_{k}": totals[2 * i] / max(totals[2 * i + 1], 1.0) for i, k in enumerate(names)}
    return evaluate


def check_config(cfg: KTOConfig) -> None:
    if cfg.beta <= 0:
        raise ConfigError(f"`beta` must be > 0, got {cfg.beta}")
    for key in ("desirable_weight", "undesirable_weight"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"`{key}` must be >= 0, got {getattr(cfg, key)}")


def balance_note(cfg: KTOConfig, items: list[dict]) -> str:
    n_d = sum(1 for it in items if it["desirable"])
    n_u = len(items) - n_d
    line = f"kto: {n_d} desirable, {n_u} undesirable rows"
    if n_d and n_u and cfg.undesirable_weight > 0:
        ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
        line += f"; desirable_weight * n_D / (undesirable_weight * n_U) = {ratio:.3g}"
        if not BALANCE[0] <= ratio <= BALANCE[1]:
            line += " (the paper advises 1 to 4/3: set the weights so)"
    return line


# --------------------------------------------------------------------------- recipe


def main(cfg: KTOConfig) -> dict:
    check_config(cfg)
    run = setup_run(cfg, "kto")
    tok = load_tokenizer(cfg.model, cfg.data.chat_template, trust_remote_code=cfg.trust_remote_code)
    device, pad_id, amp = run.device, tok.pad_token_id, autocast_dtype(cfg, run.device)
    data = load_data(cfg, tok, "unpaired", verbose=run.dist.is_main)
    train_items, eval_items = unpair(data.train), unpair(data.eval)
    assign_mismatched(train_items, cfg.seed, cfg.max_length)
    assign_mismatched(eval_items, cfg.seed, cfg.max_length)
    if run.dist.is_main:
        print(balance_note(cfg, train_items), flush=True)
    load = lambda path, keep_float32: disable_dropout(load_causal_lm(  # noqa: E731
        path, dtype=cfg.dtype, device=device, tokenizer=tok, gradient_checkpointing=cfg.gradient_checkpointing,
        keep_float32=keep_float32, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code))
    model = load(cfg.model, cfg.lora.r <= 0)  # a LoRA base stays frozen in the compute dtype
    # the reference before training (and before LoRA) is the starting weights, or ref_model; dropped after the pass
    t0 = time.perf_counter()
    ref_model = load(cfg.ref_model, True).requires_grad_(False).eval() if cfg.ref_model else model
    cache_reference(train_items + eval_items, ref_model, pad_id, device, 2 * cfg.batch_size, run.dist, amp)
    del ref_model
    if run.dist.is_main:
        print(f"reference log-probs cached for {len(train_items) + len(eval_items)} rows and their mismatched pairs "
              f"in {time.perf_counter() - t0:.2f} s", flush=True)

    run.logger.log({**data.summary, "data/train_rows": len(train_items), "data/eval_rows": len(eval_items)}, step=0)
    model, optimizer, scheduler, _ = prepare_trainable(cfg, run, model, task_type="causal_lm", n_items=len(train_items))
    collate = collate_kto(pad_id, device)
    loss_fn = kto_objective(cfg)
    evaluate = kto_evaluate(eval_items, collate, loss_fn, cfg.batch_size, run.dist) if eval_items else None
    result = train(run, cfg, model, optimizer, scheduler, train_items, collate=collate, loss_fn=loss_fn,
                   count_fn=lambda b: b.num_rows, tokens_fn=sequence_tokens, evaluate=evaluate, tokenizer=tok,
                   prepare=step_reference_point(run.dist))
    if not result.stopped:
        save_final(run, cfg, model, tok)
        print_health(run)
    run.close()
    return {"step": result.step, "stopped": result.stopped, **result.last_metrics, **result.eval_metrics}
