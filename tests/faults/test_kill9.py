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
STEPS = 40  # more steps than 20 kills can advance (each kill comes before about one step's progress)


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
    """The 40-step run (a checkpoint every step) is SIGKILLed KILLS times, each restart being `resume=auto`; then it
    runs to the end. Every other kill comes at a uniformly random moment (seeded) of the time the last restart took to
    start its first checkpoint (start-up plus one step under the load of the moment, so a kill never lets a restart
    run far); the
    others aim at a checkpoint write: the run is watched until the write of its next checkpoint starts, then
    killed 0-5 ms later. Every restart that was not killed exits 0, and final/ equals the uninterrupted run's bit
    for bit. A kill that came while this process's `.tmp-step-N` folder of the next checkpoint existed (modified
    since the process started) and its `step-N` did not landed inside a checkpoint write: the count is printed
    (the tiny model's save takes a few milliseconds, so few do; a damaged newest checkpoint is tested directly in
    test_checkpoints.py)."""
    data = arith_dir / "sft.jsonl"
    ref, out = tmp_path / "ref", tmp_path / "killed"
    t0 = time.monotonic()
    proc = _start(sft_args(tiny_model, data, ref, f"max_steps={STEPS}"))
    _wait_for_save(proc, ref, 1)
    first_save = time.monotonic() - t0  # start-up plus one step
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    rng = random.Random(16)
    kills = in_save = 0
    for _ in range(4 * KILLS):
        if kills >= KILLS:
            break
        aim_at_save = kills % 2 == 1
        target = min(_latest_step(out) + 1, STEPS)
        delay = rng.uniform(0.0, 0.005) if aim_at_save else rng.uniform(0.2, 1.0) * first_save
        started = time.time()
        proc = _start(sft_args(tiny_model, data, out, f"max_steps={STEPS}"))
        if aim_at_save:
            _wait_for_save(proc, out, target)
            if proc.poll() is None:  # this restart's start-up plus one step, under the load of the moment
                first_save = time.time() - started
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            ckpt = out / "checkpoints"
            tmp = ckpt / f".tmp-step-{target}"
            # at this moment this process is writing the next checkpoint (not an earlier kill's leftover folder)
            writing = tmp.exists() and tmp.stat().st_mtime >= started and not (ckpt / f"step-{target}").exists()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            in_save += writing
            continue
        assert proc.returncode == 0, proc.stderr.read()[-2000:]
        if (out / "final").is_dir():
            break
    assert kills >= KILLS
    proc = _start(sft_args(tiny_model, data, out, f"max_steps={STEPS}"))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    print(f"kill -9: {kills} kills, {in_save} inside a checkpoint write")
    assert same_weights(out / "final" / "model.safetensors", ref / "final" / "model.safetensors")
