"""Set-up steps that SFT, RM and DPO share: read and tokenize the data, prepare the trainable model.

Plain functions called at the top of each recipe; the loops stay in the recipes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from posttrain.data import DataStats, label_maps, load_examples, tokenize_examples, train_eval_split
from posttrain.engine import RunContext, build_optimizer, build_scheduler, full_model_state, unwrap, wrap_model
from posttrain.engine import total_steps_for
from posttrain.errors import DataError
from posttrain.models import apply_freeze, apply_lora, count_parameters, resolve_dtype, save_pretrained_atomic


@dataclass
class Data:
    train: list[dict]  # tokenized items
    eval: list[dict]
    summary: dict[str, Any]  # data stats for the log: rows, skipped by reason, truncated, dropped
    id2label: dict[int, str] | None = None  # classification only


def load_data(cfg: Any, tok: Any, kind: str, *, loss_on: str = "assistant", verbose: bool = True) -> Data:
    """Tokenized train and eval items of `kind` from `data.train` / `data.eval` (or a `data.eval_split` hold-out)."""
    if not cfg.data.train:
        raise DataError("no training data: set data.train (a file, a saved dataset folder or an HF dataset name)")
    train_ex, train_stats = load_examples(cfg.data.train, kind, fmt=cfg.data.format, skip_invalid=cfg.data.skip_invalid)
    eval_stats = DataStats()
    if cfg.data.eval:
        eval_ex, eval_stats = load_examples(cfg.data.eval, kind, fmt=cfg.data.format, skip_invalid=cfg.data.skip_invalid)
    else:
        train_ex, eval_ex = train_eval_split(train_ex, cfg.data.eval_split, seed=cfg.seed)
    if cfg.data.max_rows > 0:
        train_ex = train_ex[: cfg.data.max_rows]
    label2id = id2label = None
    if kind == "classification":
        label2id, id2label = label_maps(train_ex + eval_ex)
    train = tokenize_examples(tok, train_ex, max_length=cfg.max_length, stats=train_stats, loss_on=loss_on, label2id=label2id)
    evals = tokenize_examples(tok, eval_ex, max_length=cfg.max_length, stats=eval_stats, loss_on=loss_on, label2id=label2id)
    if not train:
        raise DataError(f"every training row was dropped ({train_stats.summary()}); raise max_length",
                        source=", ".join(cfg.data.train))
    summary = {"data/train_rows": len(train), "data/eval_rows": len(evals),
               **{f"data/{k}": v for k, v in train_stats.as_dict().items()}}
    if verbose:
        print(f"data: train {train_stats.summary()}; eval {len(evals)} rows", flush=True)
    return Data(train, evals, summary, id2label)


def prepare_trainable(cfg: Any, run: RunContext, model: nn.Module, *, task_type: str, n_items: int):
    """Freeze, add LoRA, wrap for data parallelism; build the optimizer and schedule.

    Returns (model, optimizer, scheduler, n_steps). Prints the trainable / total parameter counts."""
    model = apply_freeze(model, cfg.freeze)
    model = apply_lora(model, cfg.lora, task_type)
    trainable, total = count_parameters(model)
    if run.dist.is_main:
        print(f"model: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable "
              f"({100 * trainable / max(total, 1):.1f}%)", flush=True)
    model = wrap_model(model, run.dist, cfg.strategy)  # before the optimizer: FSDP2 replaces the parameters
    optimizer = build_optimizer(model, cfg)
    n_steps = total_steps_for(n_items, cfg, run.dist.world_size)
    scheduler = build_scheduler(optimizer, cfg, n_steps)
    return model, optimizer, scheduler, n_steps


def save_final(run: RunContext, cfg: Any, model: nn.Module, tok: Any) -> None:
    """`final/`: the trained model as a loadable HF folder (an adapter, plus `merged/` with `save.merge_lora`),
    written atomically by rank 0 (the weights of an FSDP2-sharded model are gathered first, on every rank)."""
    state = full_model_state(model)
    if run.dist.is_main:
        out = save_pretrained_atomic(unwrap(model), tok, run.output_dir / "final", merge_lora=cfg.save.merge_lora,
                                     state_dict=state, dtype=resolve_dtype(cfg.dtype, run.device))
        print(f"saved {out}", flush=True)
