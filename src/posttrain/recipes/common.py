"""What the recipes share: read and tokenize the data, prepare the trainable model, resume, run the supervised
loop with the command's settings, save `final/`.

Plain functions called from the recipes. This is where a command's config becomes the engine's explicit
arguments (`engine.loop.LoopSettings`, `BatchPlan`): the engine itself reads no config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from posttrain.data import DataStats, label_maps, load_examples, tokenize_examples, train_eval_split
from posttrain.engine import (RunContext, autocast_dtype, build_optimizer, build_scheduler, full_model_state, grad_scaler,
                              resolve_resume, steps_per_epoch, total_steps_for, unwrap_parallel, wrap_model)
from posttrain.engine.loop import BatchPlan, FitResult, LoopSettings, fit
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


def resume_step(run: RunContext, cfg: Any, state: nn.Module, optimizer=None, scheduler=None, *,
                unit: str = "step") -> tuple[int, dict]:
    """`resume`: (steps already taken, the checkpoint's saved extras), loading `state` (and the optimizer and
    schedule) from the checkpoint `resume` names; (0, {}) for a fresh run."""
    resume_from = resolve_resume(cfg.resume, run.output_dir)
    if resume_from is None:
        return 0, {}
    saved = run.checkpointer.load(resume_from, model=unwrap_parallel(state), optimizer=optimizer, scheduler=scheduler)
    if run.dist.is_main:
        print(f"resumed from {resume_from} at {unit} {int(saved['step'])}", flush=True)
    return int(saved["step"]), saved


def train(run: RunContext, cfg: Any, model: nn.Module, optimizer, scheduler, items: list, *, collate: Callable,
          loss_fn: Callable, count_fn: Callable, tokens_fn: Callable, evaluate: Callable | None = None,
          tokenizer: Any = None, prepare: Callable | None = None) -> FitResult:
    """`engine.loop.fit` over `items` with this command's settings: `max_steps` / `num_epochs`, `batch_size`,
    `grad_accum`, `seed`, `data.shuffle`, `max_grad_norm`, `dtype`, `logging.*`, `save.steps` and `resume`
    (`prepare`: `fit`'s no-grad pass over each step's micro-batches)."""
    world = run.dist.world_size
    amp = autocast_dtype(cfg, run.device)
    scaler = grad_scaler(amp, run.device)
    start, saved = resume_step(run, cfg, model, optimizer, scheduler)
    if scaler is not None and "grad_scaler" in saved:
        scaler.load_state_dict(saved["grad_scaler"])
    loop = LoopSettings(total_steps=total_steps_for(len(items), cfg, world), start_step=start,
                        log_every=max(1, int(cfg.logging.steps)), eval_every=int(cfg.logging.eval_steps),
                        save_every=int(cfg.save.steps), progress=bool(cfg.logging.progress), desc=run.command)
    plan = BatchPlan(int(cfg.batch_size), int(cfg.grad_accum), steps_per_epoch(len(items), cfg, world), int(cfg.seed),
                     bool(cfg.data.shuffle))

    def checkpoint(step: int) -> None:
        scaling = {"grad_scaler": scaler.state_dict()} if scaler is not None else {}
        run.checkpointer.save(step, model=unwrap_parallel(model), optimizer=optimizer, scheduler=scheduler,
                              extra=scaling, tokenizer=tokenizer)

    return fit(model, optimizer, scheduler, items, loop=loop, plan=plan, dist=run.dist, collate=collate,
               loss_fn=loss_fn, count_fn=count_fn, tokens_fn=tokens_fn, log=run.logger.log,
               max_grad_norm=float(cfg.max_grad_norm), autocast_dtype=amp, scaler=scaler,
               evaluate=evaluate, checkpoint=checkpoint, prepare=prepare)


def save_final(run: RunContext, cfg: Any, model: nn.Module, tok: Any, *, extra: Callable[[Path], None] | None = None,
               note: str = "") -> None:
    """`final/`: the trained model as a loadable HF folder (an adapter, plus `merged/` with `save.merge_lora`),
    written atomically by rank 0 (the weights of an FSDP2-sharded model are gathered first, on every rank);
    `extra(folder)` adds files to it before it appears (PPO's critic)."""
    state = full_model_state(model)
    if run.dist.is_main:
        out = save_pretrained_atomic(unwrap_parallel(model), tok, run.output_dir / "final", merge_lora=cfg.save.merge_lora,
                                     state_dict=state, extra=extra, dtype=resolve_dtype(cfg.dtype, run.device))
        print(f"saved {out}{note}", flush=True)
