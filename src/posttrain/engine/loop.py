"""The supervised loop shared by SFT, reward modelling and offline DPO.

A recipe gives the tokenized items and three functions — ``collate(items) -> batch``,
``loss_fn(model, batch) -> (loss_sum, stats)`` and ``count_fn(batch) -> int`` — and gets the loop:
epochs in a seeded order, the global batch split over ranks and micro-batches, one exactly
normalised optimizer step (:func:`posttrain.engine.step.train_step`), logging, evaluation,
checkpoints, resume, and a clean stop on SIGTERM / Ctrl-C.

Data order. Each epoch's order is a function of (seed, epoch) only. Optimizer step s of an epoch
takes the global chunk ``order[s*G:(s+1)*G]`` with G = batch_size * grad_accum * world_size; rank
r takes the r-th slice of batch_size * grad_accum items and cuts it into grad_accum micro-batches.
So 1 process with batch 4 and 2 processes with batch 2 see the same rows in every step, and a
resumed run restarts exactly where the checkpoint was taken. With several processes a short last
chunk is dropped (every rank must run the same number of micro-batches); with one it is a
shorter step, which the exact normalisation makes a correct one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posttrain.engine.checkpoint import resolve_resume
from posttrain.engine.dist import unwrap
from posttrain.engine.logging import Progress, write_bench_json
from posttrain.engine.optim import steps_per_epoch, total_steps_for
from posttrain.engine.run import RunContext, autocast, autocast_dtype, grad_scaler
from posttrain.engine.signals import StopSignal
from posttrain.engine.step import train_step


@dataclass
class FitResult:
    step: int
    stopped: bool  # True when a signal ended the run early (a checkpoint was saved)
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def step_items(items: Sequence[Any], cfg: Any, *, rank: int, world_size: int, epoch: int, step_in_epoch: int) -> list[list[Any]]:
    """This rank's micro-batches (lists of items) for one optimizer step (module doc)."""
    from posttrain.data import epoch_order

    order = epoch_order(len(items), shuffle=bool(cfg.data.shuffle), seed=int(cfg.seed), epoch=epoch)
    per_rank = int(cfg.batch_size) * int(cfg.grad_accum)
    start = step_in_epoch * per_rank * world_size + rank * per_rank
    mine = [items[i] for i in order[start: start + per_rank]]
    bs = int(cfg.batch_size)
    return [mine[i: i + bs] for i in range(0, len(mine), bs)]


def fit(
    run: RunContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    items: Sequence[Any],
    *,
    collate: Callable[[list[Any]], Any],
    loss_fn: Callable[[nn.Module, Any], Any],
    count_fn: Callable[[Any], int],
    tokens_fn: Callable[[Any], int],
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    tokenizer: Any = None,
    setup_seconds: float = 0.0,
) -> FitResult:
    """Train to ``max_steps`` / ``num_epochs`` (module doc). ``setup_seconds``: time spent before the loop on work
    a peer does inside its steps (DPO's reference pass), added to the benchmark's wall time."""
    cfg, dist = run.cfg, run.dist
    n_steps = total_steps_for(len(items), cfg, dist.world_size)
    per_epoch = steps_per_epoch(len(items), cfg, dist.world_size)
    step = 0
    amp = autocast_dtype(cfg, dist.device)
    scaler = grad_scaler(amp, dist.device)
    resume_from = resolve_resume(cfg.resume, run.output_dir)
    if resume_from is not None:
        state = run.checkpointer.load(resume_from, model=unwrap(model), optimizer=optimizer, scheduler=scheduler)
        step = int(state["step"])
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        if dist.is_main:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    log_every = max(1, int(cfg.logging.steps))
    eval_every = int(cfg.logging.eval_steps) or per_epoch
    save_every = int(cfg.save.steps)
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    window_tokens, window_start = 0, time.perf_counter()
    loop_start, total_tokens, first_step = time.perf_counter(), 0, step
    progress = Progress(n_steps, desc=run.command, enabled=dist.is_main and bool(cfg.logging.progress), initial=step)
    if evaluate is not None and step == 0:
        # The untrained model's numbers, so every curve starts from the same baseline.
        model.eval()
        with torch.no_grad(), autocast(amp, dist.device):
            eval_metrics = evaluate(model)
        run.logger.log(eval_metrics, step=0, epoch=0.0)
    with StopSignal() as stop, progress:
        while step < n_steps:
            epoch, in_epoch = divmod(step, per_epoch)
            groups = step_items(items, cfg, rank=dist.rank, world_size=dist.world_size, epoch=epoch, step_in_epoch=in_epoch)
            micro = [collate(g) for g in groups if g]
            model.train()
            metrics = train_step(model, micro, loss_fn, optimizer, scheduler, max_grad_norm=float(cfg.max_grad_norm),
                                 dist=dist, count_fn=count_fn, autocast_dtype=amp, scaler=scaler, step=step + 1)
            step += 1
            step_tokens = sum(tokens_fn(b) for b in micro) * dist.world_size
            window_tokens += step_tokens
            total_tokens += step_tokens
            progress.update(1, loss=metrics["loss"])
            if step % log_every == 0 or step == n_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                metrics["tokens_per_second"] = window_tokens / elapsed
                window_tokens, window_start = 0, time.perf_counter()
                metrics.pop("count", None)
                last = run.logger.log(metrics, step=step, epoch=step / per_epoch)
            if evaluate is not None and (step % eval_every == 0 or step == n_steps):
                model.eval()
                with torch.no_grad(), autocast(amp, dist.device):
                    eval_metrics = evaluate(model)
                run.logger.log(eval_metrics, step=step, epoch=step / per_epoch)
                if dist.is_main:
                    progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))
            stopping = stop.should_stop(dist)
            if (save_every and step % save_every == 0 and step < n_steps) or stopping:
                scaling = {"grad_scaler": scaler.state_dict()} if scaler is not None else {}
                run.checkpointer.save(step, model=unwrap(model), optimizer=optimizer, scheduler=scheduler,
                                      extra={"epoch": epoch, **scaling}, tokenizer=tokenizer)
            if stopping:
                if dist.is_main:
                    progress.write(f"{stop.name or 'signal'}: saved checkpoint at step {step}; resume with resume=auto")
                return FitResult(step, True, last, eval_metrics)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # CUDA runs ahead of Python: the loop ends when its last kernel does
    if dist.is_main:
        write_bench_json(steps=step - first_step, tokens=total_tokens, final_loss=last.get("loss"),
                         wall_s=time.perf_counter() - loop_start + setup_seconds,
                         params=sum(p.numel() for p in unwrap(model).parameters()))
    return FitResult(step, False, last, eval_metrics)
