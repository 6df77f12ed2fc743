"""Run set-up shared by every training recipe: processes, seeds, output folder, config, logger."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.config import ConfigError, resume_identity, save_config, to_dict, training_sources
from posttrain.engine.checkpoint import Checkpointer, run_identity
from posttrain.engine.dist import DistInfo, barrier, destroy, init_distributed
from posttrain.engine.logging import MetricsLogger
from posttrain.models.load import resolve_dtype


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every device). Every rank gets the same seed: the same init
    and the same data order; ranks then take disjoint slices of that order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(cfg: Any, device: torch.device) -> torch.dtype | None:
    """The compute dtype every forward runs under (``torch.autocast``), on a GPU and on the CPU alike, or None for
    float32 (no autocast). ``dtype``: ``auto`` -> bfloat16 on a CUDA GPU that supports it, else float32;
    ``bfloat16`` / ``float16`` as named (float16 trains with a ``grad_scaler``). The weights of trained and compared
    models stay float32 (``models.weights_dtype``), so bf16 is the arithmetic, never the storage of an update."""
    dtype = resolve_dtype(getattr(cfg, "dtype", "auto"), device)
    return None if dtype in (torch.float32, torch.float64) else dtype


def autocast(amp: torch.dtype | None, device: torch.device):
    """``torch.autocast(device, amp)``, or nothing for ``amp=None``."""
    return torch.autocast(device_type=device.type, dtype=amp) if amp is not None else contextlib.nullcontext()


def grad_scaler(amp: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for float16 compute (its 5 exponent bits underflow small gradients); None otherwise."""
    return torch.amp.GradScaler(device.type) if amp == torch.float16 else None


@dataclass
class RunContext:
    """What a recipe needs around its loop."""

    cfg: Any
    command: str
    dist: DistInfo
    output_dir: Path
    logger: MetricsLogger
    checkpointer: Checkpointer
    device: torch.device

    def close(self) -> None:
        """Flush the logs and leave the process group."""
        self.logger.close()
        barrier()
        destroy()


def setup_run(cfg: Any, command: str) -> RunContext:
    """Join the process group, seed everything from ``cfg.seed``, create ``cfg.output_dir``,
    write the resolved ``config.yaml`` (rank 0) and open the metrics logger."""
    # `strategy` is a key of sft, rm and dpo only: ppo and online-dpo refuse it (config.py)
    if getattr(cfg, "strategy", "ddp") == "fsdp" and cfg.lora.r > 0:
        raise ConfigError("`strategy: fsdp` with LoRA is not supported: the adapter is small, use ddp (the frozen "
                          "base is not sharded either way)")
    dist = init_distributed()
    seed_everything(int(getattr(cfg, "seed", 0)))
    output_dir = Path(cfg.output_dir)
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output_dir / "config.yaml")
    barrier()
    logging_cfg = getattr(cfg, "logging", None)
    report_to = list(getattr(logging_cfg, "report_to", ["jsonl"]))
    logger = MetricsLogger(output_dir, report_to, dist.is_main, run_name=f"{command}:{output_dir.name}", config=to_dict(cfg))
    keep = int(getattr(getattr(cfg, "save", None), "keep", 2))
    identity = None
    if dist.is_main:  # the only writer of manifests and the one that checks them on resume
        from posttrain.data.io import fingerprint_sources

        identity = run_identity(resume_identity(cfg), fingerprint_sources(training_sources(cfg)))
    return RunContext(
        cfg=cfg,
        command=command,
        dist=dist,
        output_dir=output_dir,
        logger=logger,
        checkpointer=Checkpointer(output_dir, keep, identity),
        device=dist.device,
    )
