"""AdamW and the learning-rate schedule (linear warm-up, then constant, linear or cosine decay).

The schedule values are those of Hugging Face's ``get_{constant,linear,cosine}_schedule_with_warmup``
so a run here and a TRL run with the same keys see the same learning rates:

    warm-up  (s < W):  lr(s) = peak * s / W
    constant:          lr(s) = peak
    linear:            lr(s) = peak * max(0, (N - s) / (N - W))
    cosine:            lr(s) = peak * max(0, 0.5 * (1 + cos(pi * (s - W) / (N - W))))

with s the number of optimizer steps already taken, N = total steps and W = ceil(warmup_ratio * N).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from posttrain.config import ConfigError

SCHEDULERS = ("constant", "linear", "cosine")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices decay, 1-D tensors (biases, norm gains) do not.

    Decaying a norm gain or a bias towards 0 only fights the normalisation; this is the usual
    split (GPT-2, nanoGPT, HF Trainer).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """torch's AdamW, with its fused kernel where every parameter allows it (a plain CPU/CUDA float tensor).

    The fused kernel computes the same update as the default per-parameter loop (to a few float32 ulps,
    tests/engine/test_optim.py) in one pass over all tensors, with no parameter-sized temporaries. It is also what
    transformers' Trainer uses by default (``adamw_torch_fused``). Sharded (FSDP2 DTensor) parameters keep the
    default.
    """
    if not groups:
        raise ConfigError("no trainable parameters: check `lora.r`, `freeze.trainable_layers` and `freeze.extra`")
    params = [p for g in groups for p in g["params"]]
    fused = all(type(p) in (torch.Tensor, nn.Parameter) and p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                for p in params)
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def build_optimizer(model: nn.Module, cfg: Any, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (``cfg.learning_rate`` unless ``lr`` is given)."""
    return adamw(param_groups(model, float(cfg.weight_decay)), float(cfg.learning_rate if lr is None else lr))


def warmup_steps(cfg: Any, total_steps: int) -> int:
    return math.ceil(float(cfg.warmup_ratio) * total_steps)


def lr_factor(step: int, *, kind: str, total_steps: int, warmup: int) -> float:
    """Multiplier of the peak learning rate after ``step`` optimizer steps (formulas in the module doc)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ConfigError(f"unknown `lr_scheduler` {kind!r}; use one of {', '.join(SCHEDULERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then ``cfg.lr_scheduler`` decay to 0 at ``total_steps``; step it once per optimizer step."""
    kind = str(cfg.lr_scheduler)
    if kind not in SCHEDULERS:
        raise ConfigError(f"unknown `lr_scheduler` {kind!r}; use one of {', '.join(SCHEDULERS)}")
    warmup = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, kind=kind, total_steps=total_steps, warmup=warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(num_rows: int, cfg: Any, world_size: int = 1) -> int:
    """Optimizer steps in one pass over ``num_rows`` with global batch G = batch_size * grad_accum * world_size.

    One process: ceil(rows / G) — a short last step is still a correct step under exact normalisation.
    Several: floor(rows / G) — the short last chunk is dropped, since every rank must run the same
    number of micro-batches (a rank with none would leave the others waiting in a collective).
    """
    global_batch = max(1, int(cfg.batch_size)) * max(1, int(cfg.grad_accum)) * max(1, world_size)
    if world_size > 1:
        return max(1, num_rows // global_batch)
    return max(1, math.ceil(num_rows / global_batch))


def total_steps_for(num_rows: int, cfg: Any, world_size: int = 1) -> int:
    """Length of training in optimizer steps: ``max_steps`` when > 0, else ceil(num_epochs * steps_per_epoch)."""
    if int(cfg.max_steps) > 0:
        return int(cfg.max_steps)
    return max(1, math.ceil(float(cfg.num_epochs) * steps_per_epoch(num_rows, cfg, world_size)))
