"""One optimizer step with exact global normalisation.

Normalisation. A step sees micro-batches b = 1..M on ranks r = 1..R. ``count_fn(b)`` is the
number of elements the loss averages over (loss tokens for SFT, pairs for DPO/RM). With
D = sum over all b and r of count(b), the step's loss is the global element mean

    L = (1 / D) * sum_{r, b} loss_sum(r, b)

where ``loss_sum`` is the SUM of per-element losses of one micro-batch. Each micro-step
back-propagates ``loss_sum * R / D``; DDP and FSDP average gradients over ranks (divide by R),
so the accumulated gradient is exactly dL/dtheta. A mean of per-micro-batch means would weight
a 3-token micro-batch like a 300-token one; this way 4 micro-steps of 1 sequence equal one of 4,
and 2 ranks equal 1 rank with the same global batch (tests/engine/test_step.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from posttrain.engine.dist import DistInfo, all_reduce_sum, gradient_sync, is_parallel
from posttrain.errors import TrainingError

LossFn = Callable[[nn.Module, Any], Any]


def _sum_and_stats(out: Any) -> tuple[torch.Tensor, dict[str, tuple[Any, Any]]]:
    """``loss_fn``'s output checked against the one contract: ``(loss_sum, {name: (sum, count)})``.

    A bare tensor or a bare stat is refused rather than guessed at: a loss fn that returns a mean would otherwise be
    divided by the step's count a second time, silently."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor) and out[0].dim() == 0
            and isinstance(out[1], Mapping)):
        got = f"a {tuple(out.shape)} tensor" if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"loss_fn must return (loss_sum, stats): the SUM of per-element losses as a 0-d tensor and a "
                        f"dict of (sum, count) stats, e.g. `return losses.sum(), {{}}`; got {got}")
    for name, value in out[1].items():
        if not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise TypeError(f"loss_fn stat {name!r} must be a (sum, count) pair, e.g. (correct.sum(), n); got "
                            f"{type(value).__name__}")
    return out[0], dict(out[1])


def _total(x: torch.Tensor | float) -> torch.Tensor | float:
    """A stat's sum in float64, left on its device: read back once per step, with the loss (no host sync per
    micro-batch, which on a GPU would stall the queue of kernels each time)."""
    return x.detach().double().sum() if isinstance(x, torch.Tensor) else float(x)


def train_step(
    model: nn.Module,
    micro_batches: Iterable[Any],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    max_grad_norm: float,
    dist: DistInfo,
    count_fn: Callable[[Any], int],
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    step: int | None = None,
) -> dict[str, float]:
    """Accumulate gradients over ``micro_batches``, clip, and take one optimizer + scheduler step.

    ``loss_fn(model, mb)`` returns ``(loss_sum, stats)``: ``loss_sum`` a 0-d tensor, the SUM of per-element
    losses (never a mean), and each stat a ``(sum, count)`` pair, reported as the global sum / the global count;
    anything else raises TypeError. Every rank must call this with the same number of
    micro-batches. ``scaler`` is a ``torch.amp.GradScaler`` for float16 autocast: a step whose
    gradients overflow is then skipped by the scaler instead of stopping the run.

    Returns ``loss`` (global mean, formula in the module doc), ``grad_norm`` (before clipping),
    ``learning_rate`` (the one this update used), ``count`` (D) and the reduced stats.
    Raises :class:`TrainingError` when the loss or the gradient norm is not finite; the weights
    are then left as they were before this step.
    """
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    if dist.distributed and not is_parallel(model):
        raise ValueError("with several processes, wrap the model with posttrain.engine.wrap_model first")
    if step is None and scheduler is not None:
        step = scheduler.last_epoch + 1
    device = dist.device

    local_count = float(sum(int(count_fn(mb)) for mb in micro_batches))
    denominator = all_reduce_sum(torch.tensor(local_count, dtype=torch.float64, device=device)).item()
    # R / D: the ranks' gradient averaging divides by R again (module doc).
    scale = dist.world_size / max(denominator, 1.0)

    loss_total: torch.Tensor | float = 0.0
    stat_sums: dict[str, torch.Tensor | float] = {}
    stat_counts: dict[str, torch.Tensor | float] = {}
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with gradient_sync(model, enabled=last):
            amp = (
                torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with amp:
                loss_sum, stats = _sum_and_stats(loss_fn(model, mb))
            # Half-precision sums are lifted to float32 before scaling; float32/64 stay as they are.
            if loss_sum.dtype in (torch.float16, torch.bfloat16):
                loss_sum = loss_sum.float()
            scaled = loss_sum * scale
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_total = loss_total + _total(loss_sum)
        for name, (s, c) in stats.items():
            stat_sums[name] = stat_sums.get(name, 0.0) + _total(s)
            stat_counts[name] = stat_counts.get(name, 0.0) + _total(c)

    # One collective and one read-back for the loss and every stat (sums, then counts).
    names = sorted(stat_sums)
    packed = [loss_total] + [stat_sums[n] for n in names] + [stat_counts[n] for n in names]
    packed = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in packed])
    reduced = all_reduce_sum(packed).tolist()
    loss = reduced[0] / max(denominator, 1.0)
    metrics: dict[str, float] = {}
    for k, n in enumerate(names):
        count = reduced[1 + len(names) + k]
        metrics[n] = reduced[1 + k] / max(count, 1.0) if count else 0.0

    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(
            f"step {step}: the loss is {loss} (not finite); the run stops before this update. "
            "Lower learning_rate, raise warmup_ratio, or check the data of this step"
        )

    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # max_norm = inf measures the norm without changing the gradients (clip coefficient is 1).
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: DTensor -> tensor
    grad_norm = float(norm)
    if not math.isfinite(grad_norm) and scaler is None:
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(
            f"step {step}: the gradient norm is {grad_norm} (not finite) at loss {loss:.4g}; the run stops "
            "before this update. Lower learning_rate or use dtype=bfloat16/float32"
        )

    learning_rate = float(optimizer.param_groups[0]["lr"])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate, "count": denominator, **metrics}
