"""posttrain.engine: the shared training machinery (docs/internals.md, "posttrain.engine").

Optimizer and schedule, one exactly normalised optimizer step with accumulation and clipping,
torch.distributed (DDP / FSDP2, gloo on CPU), atomic checkpoints and resume, stop signals,
metrics logging and progress.
"""

from posttrain.engine.checkpoint import Checkpointer, full_model_state, list_checkpoints, load_checkpoint, resolve_resume
from posttrain.engine.dist import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    broadcast_object,
    contiguous_share,
    init_distributed,
    unwrap_parallel,
    wrap_model,
)
from posttrain.engine.ema import ema_update
from posttrain.engine.logging import MetricsLogger, Progress, format_metrics, read_metrics
from posttrain.engine.optim import build_optimizer, build_scheduler, steps_per_epoch, total_steps_for
from posttrain.engine.run import RunContext, autocast, autocast_dtype, grad_scaler, seed_everything, setup_run
from posttrain.engine.signals import StopSignal
from posttrain.engine.step import train_step

__all__ = [
    "Checkpointer",
    "DistInfo",
    "MetricsLogger",
    "Progress",
    "RunContext",
    "StopSignal",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "autocast",
    "autocast_dtype",
    "barrier",
    "broadcast_object",
    "build_optimizer",
    "build_scheduler",
    "contiguous_share",
    "ema_update",
    "format_metrics",
    "grad_scaler",
    "full_model_state",
    "init_distributed",
    "list_checkpoints",
    "load_checkpoint",
    "read_metrics",
    "resolve_resume",
    "seed_everything",
    "setup_run",
    "steps_per_epoch",
    "total_steps_for",
    "train_step",
    "unwrap_parallel",
    "wrap_model",
]
