"""RolloutShare: a rank's share of a rollout, and the batch statistics it combines over ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from posttrain.engine.dist import RolloutShare
from posttrain.losses import masked_whiten

HERE = Path(__file__).parent


def test_one_process_is_the_whole_batch():
    share = RolloutShare(3, 2, None)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    assert share.take([7, 8, 9]) == [7, 8, 9] and (share.row_offset, share.total_rows) == (0, 6)
    assert share.sum([1.5, 2.0]) == [1.5, 2.0] and share.mean({"a": 0.5}) == {"a": 0.5}
    assert share.count(mask) == 3 and share.rows_per_rank(16) == 16
    torch.testing.assert_close(share.whiten(x, mask), masked_whiten(x, mask), rtol=0, atol=0)


def test_two_ranks_combine_into_the_whole_batch_statistics():
    """Uneven shares (2 prompts on rank 0, 1 on rank 1), valid tokens 5+2+4+1 vs 3+5: each rank's whitened rows,
    counts, sums and the gathered list equal the one-process values to 1e-12 (share_worker.py checks on each rank)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "share_worker.py")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
