"""Stop cleanly on SIGTERM (schedulers, ``kill``) and SIGINT (Ctrl-C).

The handler only sets a flag; the training loop checks :meth:`StopSignal.should_stop` between
optimizer steps, saves a checkpoint and returns. The flag is all-reduced so every rank stops
at the same step even when the signal reached only one of them (a rank that stopped alone
would leave the others waiting in a collective forever). A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

from posttrain.engine.dist import DistInfo, all_reduce_max


class StopSignal:
    """Context manager: while inside, SIGTERM/SIGINT set ``requested`` instead of killing the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    received: int | None = None  # the last signal any StopSignal caught in this process (`posttrain demo` reads it)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        StopSignal.received = signum

    def __enter__(self) -> StopSignal:
        # Signal handlers can only be installed from the main thread; elsewhere the flag stays off.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def should_stop(self, dist: DistInfo | None = None) -> bool:
        """True on every rank when any rank received a signal (a collective: call it on all ranks)."""
        device = dist.device if dist is not None else torch.device("cpu")
        flag = torch.tensor(1.0 if self.requested else 0.0, device=device)
        return bool(all_reduce_max(flag).item() > 0)
