"""Shared pieces of the "2 gloo processes == 1 process" recipe tests."""

from __future__ import annotations

import os
import subprocess
import sys

from safetensors.torch import load_file


def run_two_processes(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """`posttrain ARGS --nproc 2` (torchrun, gloo, 1 thread a rank); fails the test with the output tails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "posttrain", *args, "--nproc", "2"], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_trained_weights(file_a, file_b) -> None:
    """Two safetensors files of runs that should agree up to float32 rounding. Adam divides by |g|, so the few weights
    whose gradient is at rounding level may move differently: at most 0.1% of a tensor's entries may differ by more
    than 1e-5, and the mean difference stays under 1e-7 (a real difference in the update moves most entries by ~lr)."""
    a, b = load_file(str(file_a)), load_file(str(file_b))
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert (diff > 1e-5).double().mean() < 1e-3 and diff.mean() < 1e-7, k
