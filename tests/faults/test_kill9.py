"""Kill -9 at random moments, N >= 20 times on one run: every resume succeeds, the end equals the uninterrupted
run bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from helpers import same_weights, sft_args

pytestmark = pytest.mark.slow

KILLS = 20


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "posttrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_kill_9_at_random_moments_then_resume_ends_on_the_uninterrupted_weights(tiny_model, arith_dir, tmp_path):
    """The 6-step run (a checkpoint every step) is SIGKILLed at a uniformly random moment of its expected run time
    (seeded), KILLS times, each restart being `resume=auto`; then it runs to the end. Every restart that was not
    killed exits 0, and final/ equals the uninterrupted run's bit for bit. The number of kills that landed inside a
    checkpoint write (a `.tmp-step-*` folder left behind) is printed."""
    data = arith_dir / "sft.jsonl"
    ref, out = tmp_path / "ref", tmp_path / "killed"
    t0 = time.monotonic()
    proc = _start(sft_args(tiny_model, data, ref))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    duration = time.monotonic() - t0
    rng = random.Random(16)
    kills = in_save = 0
    for _ in range(4 * KILLS):
        if kills >= KILLS:
            break
        proc = _start(sft_args(tiny_model, data, out))
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.0) * duration)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            in_save += any((out / "checkpoints").glob(".tmp-step-*"))
            continue
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
        if (out / "final").is_dir():
            break
    assert kills >= KILLS
    proc = _start(sft_args(tiny_model, data, out))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    print(f"kill -9: {kills} kills, {in_save} inside a checkpoint write")
    assert same_weights(out / "final" / "model.safetensors", ref / "final" / "model.safetensors")
