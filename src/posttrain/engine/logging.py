"""Metrics out of a run: ``metrics.jsonl`` always, tensorboard / wandb on request, a progress bar.

Metric names follow TRL's where the quantity is the same (``loss``, ``learning_rate``,
``grad_norm``, ``tokens_per_second``, ``epoch``, ``step``, ``eval_loss`` ...), so plots and
scripts move between the two. Only rank 0 writes; on other ranks every call is a no-op.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError

REPORTERS = ("jsonl", "tensorboard", "wandb")


def _number(v: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become floats; NaN/inf become null."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Appends one JSON object per line to ``output_dir/metrics.jsonl`` (flushed at each write)."""

    def __init__(self, output_dir: str | Path, report_to: list[str] | tuple[str, ...] = ("jsonl",), is_main: bool = True,
                 *, run_name: str | None = None, config: dict[str, Any] | None = None):
        unknown = [r for r in report_to if r not in REPORTERS]
        if unknown:
            raise ConfigError(f"`logging.report_to`: unknown {unknown}; use any of {', '.join(REPORTERS)}")
        self.is_main = is_main
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "`logging.report_to` includes tensorboard, which is not installed: pip install posttrain[tensorboard]"
                ) from None
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "`logging.report_to` includes wandb, which is not installed: pip install posttrain[wandb]"
                ) from None
            self._wandb = wandb.init(project="posttrain", name=run_name, dir=str(output_dir), config=config)

    def log(self, metrics: dict[str, Any], *, step: int, epoch: float | None = None) -> dict[str, Any]:
        """Write ``{"step": step, "epoch": epoch, **metrics}``; return the record."""
        record: dict[str, Any] = {"step": int(step)}
        if epoch is not None:
            record["epoch"] = round(float(epoch), 6)
        record.update({k: _number(v) for k, v in metrics.items()})
        if not self.is_main:
            return record
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of a run folder's)."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def format_metrics(metrics: dict[str, Any]) -> str:
    """One readable line: ``loss 1.234 | learning_rate 2.000e-05 | grad_norm 0.512``."""
    parts = []
    for k, v in metrics.items():
        v = _number(v)
        if isinstance(v, float):
            parts.append(f"{k} {v:.3e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5) else f"{k} {v:.4g}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


class Progress:
    """A tqdm bar over optimizer steps with ETA and the live loss; silent when not ``enabled``."""

    def __init__(self, total: int, desc: str = "train", enabled: bool = True, initial: int = 0):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, unit="step")
        self._start = time.monotonic()

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in ((k, _number(v)) for k, v in postfix.items())}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def write(self, text: str) -> None:
        """Print a line above the bar without breaking it."""
        self._bar.write(text)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
