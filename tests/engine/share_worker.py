"""torchrun worker for tests/engine/test_rollout_share.py: each rank takes its RolloutShare of a 3-prompt x 2-sample
batch (rank 0: prompts 0-1, rows 0-3; rank 1: prompt 2, rows 4-5) and checks that the share's statistics are the
whole batch's, as one process computes them. Exits non-zero with the mismatch on failure."""

from __future__ import annotations

import sys

import torch

from posttrain.engine.dist import RolloutShare, destroy, init_distributed
from posttrain.losses import masked_whiten


def whole_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g)  # (N, R): 3 prompts x 2 samples
    lengths = torch.tensor([5, 2, 4, 1, 3, 5])
    return x, torch.arange(5)[None, :] < lengths[:, None]  # (N, R) valid tokens


def main() -> None:
    dist = init_distributed()
    x, mask = whole_batch()
    share = RolloutShare(3, 2, dist)
    rows = slice(share.row_offset, share.row_offset + 2 * len(share.take([0, 1, 2])))
    assert (share.row_offset, share.total_rows) == ((0, 6) if dist.rank == 0 else (4, 6)), share.row_offset
    checks = {
        "whiten": (share.whiten(x[rows], mask[rows]), masked_whiten(x, mask)[rows]),
        "whiten_scale_only": (share.whiten(x[rows], mask[rows], shift_mean=False),
                              masked_whiten(x, mask, shift_mean=False)[rows]),
        "count": (torch.tensor(share.count(mask[rows])), mask.sum()),
        "sum": (torch.tensor(share.sum([float(x[rows].sum())]), dtype=torch.float64), x.sum().reshape(1)),
        "gather": (torch.tensor(share.gather(x[rows, 0].tolist()), dtype=torch.float64), x[:, 0]),
    }
    for name, (got, want) in checks.items():
        if not torch.allclose(got.double(), want.double(), rtol=0, atol=1e-12):
            sys.exit(f"rank {dist.rank}: {name} {got.tolist()} != {want.tolist()}")
    destroy()


if __name__ == "__main__":
    main()
