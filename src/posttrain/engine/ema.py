"""Exponential moving average of weights, for PPO's reference model (Xu et al. 2024, sec. 5):
after each actor step, pi_ref <- eta * pi + (1 - eta) * pi_ref."""

from __future__ import annotations

import torch
from torch import nn

from posttrain.engine.dist import unwrap_parallel


@torch.no_grad()
def ema_update(target_model: nn.Module, source_model: nn.Module, eta: float) -> None:
    """In place: every parameter of ``target_model`` <- eta * source + (1 - eta) * target.

    Parameters are matched by name (both models unwrapped from DDP); eta = 0 leaves the target
    unchanged, eta = 1 copies the source. The blend is done in the target's dtype: float32 in a training run
    (a reference is loaded with `keep_float32`), as in bf16 a step of eta = 1e-3 toward the policy rounds away.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"EMA weight eta must be in [0, 1], got {eta}")
    source = dict(unwrap_parallel(source_model).named_parameters())
    for name, t in unwrap_parallel(target_model).named_parameters():
        if name not in source:
            raise ValueError(f"EMA: the source model has no parameter `{name}` (are both the same architecture?)")
        # lerp: t + eta * (s - t) = eta * s + (1 - eta) * t
        t.lerp_(source[name].detach().to(device=t.device, dtype=t.dtype), eta)
