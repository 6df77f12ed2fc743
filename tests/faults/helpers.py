"""Shared pieces of the fault-injection suite: a short tiny SFT run and reading its weights."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file


def sft_args(model, data, out, *extra) -> list[str]:
    """A 6-step tiny SFT run on 48 rows, checkpointed every step, constant learning rate (an extended run then
    equals a longer one)."""
    return ["sft", f"model={model}", f"data.train={data}", f"output_dir={out}", "data.max_rows=48",
            "batch_size=8", "learning_rate=3e-3", "lr_scheduler=constant", "max_length=48", "max_steps=6",
            "save.steps=1", "logging.progress=false", "logging.steps=1", *extra]


def same_weights(a: Path, b: Path) -> bool:
    """Bit for bit: every tensor of two safetensors files equal."""
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
