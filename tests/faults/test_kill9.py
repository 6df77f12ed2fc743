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
STEPS = 12


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "posttrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _latest_step(out) -> int:
    return max((int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")), default=0)


def _wait_for_save(proc: subprocess.Popen, out, step: int) -> None:
    """Until the write of checkpoint `step` starts (its `.tmp-step-N` folder appears; polled every millisecond, a
    save of the tiny model takes ~50 ms), it is done without being seen, or the run ends."""
    tmp, done = out / "checkpoints" / f".tmp-step-{step}", out / "checkpoints" / f"step-{step}"
    while proc.poll() is None and not tmp.exists() and not done.exists():
        time.sleep(0.001)


def test_kill_9_at_random_moments_then_resume_ends_on_the_uninterrupted_weights(tiny_model, arith_dir, tmp_path):
    """The 12-step run (a checkpoint every step) is SIGKILLed KILLS times, each restart being `resume=auto`; then it
    runs to the end. Every other kill comes at a uniformly random moment of the run's expected time (seeded); the
    others aim at a checkpoint write: the run is watched until the write of its next checkpoint starts, then
    killed 0-60 ms later. Every restart that was not killed exits 0, and final/ equals the uninterrupted run's bit
    for bit. A kill that left a `.tmp-step-*` (inside the write) or a `.del-step-*` (inside the rotation) folder
    behind landed inside a checkpoint write: at least a quarter of the kills must have, and the count is printed."""
    data = arith_dir / "sft.jsonl"
    ref, out = tmp_path / "ref", tmp_path / "killed"
    t0 = time.monotonic()
    proc = _start(sft_args(tiny_model, data, ref, f"max_steps={STEPS}"))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    duration = time.monotonic() - t0
    rng = random.Random(16)
    kills = in_save = 0
    for _ in range(4 * KILLS):
        if kills >= KILLS:
            break
        aim_at_save = kills % 2 == 1
        target = min(_latest_step(out) + 1, STEPS)
        delay = rng.uniform(0.0, 0.06) if aim_at_save else rng.uniform(0.2, 0.7) * duration
        proc = _start(sft_args(tiny_model, data, out, f"max_steps={STEPS}"))
        if aim_at_save:
            _wait_for_save(proc, out, target)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            in_save += any((out / "checkpoints").glob(".tmp-step-*")) or any((out / "checkpoints").glob(".del-step-*"))
            continue
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
        if (out / "final").is_dir():
            break
    assert kills >= KILLS
    proc = _start(sft_args(tiny_model, data, out, f"max_steps={STEPS}"))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    print(f"kill -9: {kills} kills, {in_save} inside a checkpoint write")
    assert in_save >= KILLS // 4
    assert same_weights(out / "final" / "model.safetensors", ref / "final" / "model.safetensors")
