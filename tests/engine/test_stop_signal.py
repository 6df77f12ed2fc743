"""StopSignal turns a real SIGTERM / SIGINT into a flag and restores the handlers on exit."""

from __future__ import annotations

import os
import signal

import pytest

from posttrain.engine import StopSignal


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_real_signal_sets_the_flag(sig):
    before = {s: signal.getsignal(s) for s in StopSignal.SIGNALS}
    with StopSignal() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), sig)  # delivered to the main thread before the next bytecode
        assert stop.requested and stop.should_stop()
        assert stop.name == sig.name
    assert {s: signal.getsignal(s) for s in StopSignal.SIGNALS} == before


def test_a_second_ctrl_c_interrupts_at_once():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
