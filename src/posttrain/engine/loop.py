"""The one loop contract every recipe uses.

A loop is a number of steps: an optimizer step (SFT, RM, DPO), a PPO iteration, an online-DPO round. Around
each step it keeps a progress bar, checks for SIGTERM / Ctrl-C (on every rank at once), and writes checkpoints
at a cadence. A recipe builds :class:`LoopSettings` from its own config, with every number said out loud
(length, where a resumed run starts, cadences), and writes the step itself as the body of a ``for``:

    steps = Steps(LoopSettings(total_steps=n, start_step=resumed, save_every=100), dist, checkpoint=save)
    for step in steps:          # step = 1-based number of the step being taken
        ...                     # one step, read as one process
    if steps.stopped: ...       # a signal ended the run; `checkpoint(step)` has been called

The engine reads no config: what it needs comes in through these arguments.

:func:`fit` is that loop for supervised data (SFT, RM, DPO, each online-DPO round). The recipe gives the
tokenized items and three functions: ``collate(items) -> batch``, ``loss_fn(model, batch) -> (loss_sum,
{name: (sum, count)})`` and ``count_fn(batch) -> int``; fit takes exactly normalised optimizer steps
(:func:`posttrain.engine.step.train_step`), logs, and evaluates.

Data order. Each epoch's order is a function of (seed, epoch) only. Optimizer step s of an epoch takes the global
chunk ``order[s*G:(s+1)*G]`` with G = batch_size * grad_accum * world_size; rank r takes the r-th slice of
batch_size * grad_accum items and cuts it into grad_accum micro-batches. So 1 process with batch 4 and 2
processes with batch 2 see the same rows in every step, and a resumed run restarts exactly where the checkpoint
was taken. With several processes a short last chunk is dropped (every rank must run the same number of
micro-batches); with one it is a shorter step, which the exact normalisation makes a correct one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posttrain.engine.dist import DistInfo
from posttrain.engine.logging import Progress
from posttrain.engine.run import autocast
from posttrain.engine.signals import StopSignal
from posttrain.engine.step import train_step

LogFn = Callable[..., dict]  # log(metrics, step=, epoch=) -> the written record (MetricsLogger.log)


@dataclass(frozen=True)
class LoopSettings:
    """How long a loop runs and at which cadence it logs, evaluates and saves (0 = never in between)."""

    total_steps: int
    start_step: int = 0  # steps already taken: a resumed run starts after them
    log_every: int = 1
    eval_every: int = 0  # fit: 0 = once per epoch
    save_every: int = 0  # checkpoints in between; a stop signal always writes one when there is a `checkpoint`
    progress: bool = True
    desc: str = "train"
    unit: str = "step"  # what one step is called in messages: step, iteration, round


class Steps:
    """``for step in Steps(settings, dist, checkpoint)``: the loop of the module doc.

    After each body: the progress bar moves, the stop flag is combined over ranks, and ``checkpoint(step)`` runs
    every ``save_every`` steps (not after the last one: the recipe saves ``final/``) and on a stop signal, after
    which the iteration ends with ``stopped`` set."""

    def __init__(self, settings: LoopSettings, dist: DistInfo, checkpoint: Callable[[int], None] | None = None):
        self.settings, self.dist, self.checkpoint = settings, dist, checkpoint
        self.step, self.stopped = settings.start_step, False
        self.progress = Progress(settings.total_steps, desc=settings.desc, enabled=dist.is_main and settings.progress,
                                 initial=settings.start_step)
        self._postfix: dict[str, Any] = {}

    def show(self, **postfix: Any) -> None:
        """Numbers shown beside the progress bar after this step."""
        self._postfix = postfix

    def write(self, text: str) -> None:
        """A line above the progress bar (rank 0 only)."""
        if self.dist.is_main:
            self.progress.write(text)

    def due(self, every: int, step: int) -> bool:
        """True every `every` steps (never when 0) and at the last step."""
        return (every > 0 and step % every == 0) or step == self.settings.total_steps

    def __iter__(self) -> Iterator[int]:
        s = self.settings
        with StopSignal() as stop, self.progress:
            while self.step < s.total_steps:
                yield self.step + 1
                self.step += 1
                self.progress.update(1, **self._postfix)
                stopping = stop.should_stop(self.dist)
                cadence = s.save_every > 0 and self.step % s.save_every == 0 and self.step < s.total_steps
                if self.checkpoint is not None and (cadence or stopping):
                    self.checkpoint(self.step)
                if stopping:
                    self.stopped = True
                    done = (f"saved checkpoint at {s.unit} {self.step}; resume with resume=auto"
                            if self.checkpoint is not None else f"stopped after {s.unit} {self.step}")
                    self.write(f"{stop.name or 'signal'}: {done}")
                    return


@dataclass(frozen=True)
class BatchPlan:
    """Which items each rank's micro-batches of an optimizer step hold (module doc, "Data order")."""

    batch_size: int
    grad_accum: int
    steps_per_epoch: int
    seed: int
    shuffle: bool = True

    def micro_batches(self, items: Sequence[Any], dist: DistInfo, step: int) -> list[list[Any]]:
        """This rank's micro-batches (lists of items) of optimizer step `step` (1-based)."""
        from posttrain.data import epoch_order

        epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
        order = epoch_order(len(items), shuffle=self.shuffle, seed=self.seed, epoch=epoch)
        per_rank = self.batch_size * self.grad_accum
        start = in_epoch * per_rank * dist.world_size + dist.rank * per_rank
        mine = [items[i] for i in order[start: start + per_rank]]
        return [g for g in (mine[i: i + self.batch_size] for i in range(0, len(mine), self.batch_size)) if g]


@dataclass
class FitResult:
    step: int
    stopped: bool  # True when a signal ended the run early (a checkpoint was saved when there was a `checkpoint`)
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    items: Sequence[Any],
    *,
    loop: LoopSettings,
    plan: BatchPlan,
    dist: DistInfo,
    collate: Callable[[list[Any]], Any],
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, dict]],
    count_fn: Callable[[Any], int],
    tokens_fn: Callable[[Any], int],
    log: LogFn,
    max_grad_norm: float,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint: Callable[[int], None] | None = None,
    prepare: Callable[[nn.Module, list[Any]], list[Any]] | None = None,
) -> FitResult:
    """Take optimizer steps ``loop.start_step + 1 .. loop.total_steps`` over ``items`` (module doc).

    ``log(metrics, step=, epoch=)`` every ``loop.log_every`` steps (the step's metrics plus ``tokens_per_second``,
    non-padding tokens over the ranks per second since the last log); ``evaluate(model)`` under no_grad before the
    first step of a fresh run, every ``loop.eval_every`` steps (0: once per epoch) and at the end, logged with the
    ``eval_`` names it returns. ``prepare(model, micro_batches) -> micro_batches`` runs under no_grad (and autocast)
    before each step, for a statistic of the step's whole batch that every micro-batch's loss needs (KTO's KL
    reference point)."""
    per_epoch = plan.steps_per_epoch
    eval_every = loop.eval_every or per_epoch
    steps = Steps(loop, dist, checkpoint)
    last: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}

    def run_eval(step: int) -> None:
        nonlocal eval_metrics
        model.eval()
        with torch.no_grad(), autocast(autocast_dtype, dist.device):
            eval_metrics = evaluate(model)
        log(eval_metrics, step=step, epoch=step / per_epoch)

    if evaluate is not None and loop.start_step == 0:
        run_eval(0)  # the untrained model's numbers, so every curve starts from the same baseline
    window_tokens, window_start = 0, time.perf_counter()
    for step in steps:
        micro = [collate(g) for g in plan.micro_batches(items, dist, step)]
        model.train()
        if prepare is not None:
            with torch.no_grad(), autocast(autocast_dtype, dist.device):
                micro = prepare(model, micro)
        metrics = train_step(model, micro, loss_fn, optimizer, scheduler, max_grad_norm=max_grad_norm, dist=dist,
                             count_fn=count_fn, autocast_dtype=autocast_dtype, scaler=scaler, step=step)
        window_tokens += sum(tokens_fn(b) for b in micro) * dist.world_size
        steps.show(loss=metrics["loss"])
        if steps.due(loop.log_every, step):
            metrics["tokens_per_second"] = window_tokens / max(time.perf_counter() - window_start, 1e-9)
            window_tokens, window_start = 0, time.perf_counter()
            metrics.pop("count", None)
            last = log(metrics, step=step, epoch=step / per_epoch)
        if evaluate is not None and steps.due(eval_every, step):
            run_eval(step)
            steps.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in eval_metrics.items()))
    return FitResult(steps.step, steps.stopped, last, eval_metrics)
