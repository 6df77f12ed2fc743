"""Supervised fine-tuning: `posttrain sft`.

Two forms (seed, "SFT"):

- ``task: causal_lm`` — instruction tuning. Minimise the negative log-likelihood of the target tokens
  (assistant turns by default, ``loss_on``), the end-of-turn EOS included so the model learns to stop.
  The loss is a token mean over the whole optimizer step: sum of NLL over every target token of every
  micro-batch on every rank, divided by the global count of target tokens (engine/step.py). With
  ``packing`` the micro-batch's sequences are concatenated into one row with no padding (padding-free),
  positions restarting per sequence and no attention across them (on SDPA attention one causal attention
  call per sequence, `models.forward`), so the loss and gradients equal the padded batch's
  (tests/data/test_collate.py) while no pad token is computed.
- ``task: classification`` — transfer learning: the pre-trained backbone plus a new, randomly
  initialised classification head (``num_labels``; label names kept in the saved config). Train the
  head and the top ``freeze.trainable_layers`` blocks (or everything, or LoRA); cross-entropy is a
  sequence mean over the step. Reports accuracy and macro-F1 on ``data.eval``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F

from posttrain.config import SFTConfig
from posttrain.data import IGNORE, collate_classification, collate_sft, pack_sft
from posttrain.engine import setup_run
from posttrain.engine.dist import EvalShare
from posttrain.eval.health import print_health
from posttrain.errors import PosttrainError
from posttrain.losses import sft_loss
from posttrain.models import load_causal_lm, load_sequence_classifier, load_tokenizer, token_logprobs
from posttrain.models.forward import packing_layout
from posttrain.recipes.common import load_data, prepare_trainable, save_final, train


# --------------------------------------------------------------------------- causal LM


def lm_loss(model, batch):
    """Sum of per-token NLL over the batch's target tokens (normalised by the engine)."""
    logp = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids)  # (B, T-1)
    mask = (batch.labels[:, 1:] != IGNORE).to(logp.dtype)  # (B, T-1): position t predicts token t+1
    return sft_loss(logp, mask).sum(), {}


def lm_batches(items, cfg, pad_id, device):
    """`collate` for the loop: a right-padded batch, or (packing) the same items in one row with no padding."""
    def collate(group):
        if cfg.packing:
            width = sum(len(it["input_ids"]) for it in group)
            (batch,) = pack_sft(group, width, pad_id=pad_id)  # (1, sum of lengths)
        else:
            batch = collate_sft(group, pad_id)
        return batch.to(device)
    return collate


def lm_evaluate(items, cfg, pad_id, device, dist=None):
    def evaluate(model):
        share, nll, n = EvalShare(items, model, dist), 0.0, 0
        for i in range(0, len(share.items), cfg.batch_size):
            batch = collate_sft(share.items[i: i + cfg.batch_size], pad_id).to(device)
            loss_sum, _ = lm_loss(share.model, batch)
            nll += float(loss_sum)
            n += batch.num_targets
        nll, n = share.sum([nll, n])
        mean = nll / max(n, 1)
        return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0))}
    return evaluate


# --------------------------------------------------------------------------- classification


def cls_loss(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits  # (B, C)
    loss = F.cross_entropy(logits.float(), batch.labels, reduction="sum")
    correct = (logits.argmax(-1) == batch.labels).sum()
    return loss, {"accuracy": (correct, batch.labels.numel())}


def cls_evaluate(items, cfg, pad_id, device, dist=None):
    from posttrain.eval.metrics import macro_f1

    def evaluate(model):
        share, preds, labels, loss = EvalShare(items, model, dist), [], [], 0.0
        for i in range(0, len(share.items), cfg.batch_size):
            batch = collate_classification(share.items[i: i + cfg.batch_size], pad_id).to(device)
            logits = share.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            loss += float(F.cross_entropy(logits.float(), batch.labels, reduction="sum"))
            preds += logits.argmax(-1).tolist()
            labels += batch.labels.tolist()
        (loss,), preds, labels = share.sum([loss]), share.gather(preds), share.gather(labels)
        acc = sum(p == t for p, t in zip(preds, labels)) / max(len(labels), 1)
        return {"eval_loss": loss / max(len(labels), 1), "eval_accuracy": acc,
                "eval_macro_f1": macro_f1(preds, labels)}
    return evaluate


# --------------------------------------------------------------------------- recipe


def main(cfg: SFTConfig) -> dict:
    run = setup_run(cfg, "sft")
    tok = load_tokenizer(cfg.model, cfg.data.chat_template, trust_remote_code=cfg.trust_remote_code)
    device = run.device

    if cfg.task == "causal_lm":
        data = load_data(cfg, tok, "sft", loss_on=cfg.loss_on, verbose=run.dist.is_main)
        model = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, tokenizer=tok, keep_float32=cfg.lora.r <= 0,
                               gradient_checkpointing=cfg.gradient_checkpointing,
                               attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
        if cfg.packing and run.dist.is_main:
            print(f"packing: {packing_layout(model)}", flush=True)
        task_type = "causal_lm"
        collate = lm_batches(data.train, cfg, tok.pad_token_id, device)
        loss_fn = lm_loss
        count_fn = lambda b: int((b.labels[:, 1:] != IGNORE).sum())  # noqa: E731 - target tokens
        tokens_fn = lambda b: int((b.input_ids != tok.pad_token_id).sum()) if b.attention_mask is None else int(b.attention_mask.sum())  # noqa: E731
        evaluate = lm_evaluate(data.eval, cfg, tok.pad_token_id, device, run.dist) if data.eval else None
    else:
        data = load_data(cfg, tok, "classification", verbose=run.dist.is_main)
        num_labels = cfg.num_labels or len(data.id2label)
        if num_labels < len(data.id2label):
            raise PosttrainError(f"`num_labels` is {num_labels} but the data has {len(data.id2label)} labels: "
                                 f"{sorted(data.id2label.values())}")
        names = [data.id2label.get(i, str(i)) for i in range(num_labels)]
        model = load_sequence_classifier(cfg.model, num_labels=num_labels, id2label=names, dtype=cfg.dtype,
                                         device=device, tokenizer=tok, gradient_checkpointing=cfg.gradient_checkpointing,
                                         keep_float32=cfg.lora.r <= 0,
                                         attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
        task_type = "seq_cls"
        collate = lambda g: collate_classification(g, tok.pad_token_id).to(device)  # noqa: E731
        loss_fn = cls_loss
        count_fn = lambda b: int(b.labels.numel())  # noqa: E731 - sequences
        tokens_fn = lambda b: int(b.attention_mask.sum())  # noqa: E731
        evaluate = cls_evaluate(data.eval, cfg, tok.pad_token_id, device, run.dist) if data.eval else None

    run.logger.log(data.summary, step=0)
    model, optimizer, scheduler, _ = prepare_trainable(cfg, run, model, task_type=task_type, n_items=len(data.train))
    result = train(run, cfg, model, optimizer, scheduler, data.train, collate=collate, loss_fn=loss_fn,
                   count_fn=count_fn, tokens_fn=tokens_fn, evaluate=evaluate, tokenizer=tok)
    if not result.stopped:
        save_final(run, cfg, model, tok)
        print_health(run)
    run.close()
    return {"step": result.step, "stopped": result.stopped, **result.last_metrics, **result.eval_metrics}
