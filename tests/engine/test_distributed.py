"""Two gloo processes under torchrun give the same result as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def test_two_ranks_equal_one_rank(tmp_path, monkeypatch):
    """3 steps of AdamW + linear decay + clipping on a float64 causal transformer. Global batch: 4 sequences with
    2, 10, 4, 3 loss tokens; rank 0 holds 2 + 4 = 6 tokens and rank 1 holds 10 + 3 = 13, in 2
    micro-batches of 1 each, so an average of per-rank means would differ. The one-process run takes
    all 4 in one micro-batch. Weights match to 1e-10, losses to 1e-10; a signal on rank 1 stops both
    ranks; rank 0 wrote the checkpoint."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    sys.path.insert(0, str(HERE))
    import dist_worker

    single_dir = tmp_path / "single"
    history1, state1 = dist_worker.run(single_dir)

    multi_dir = tmp_path / "multi"
    multi_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "dist_worker.py"), str(multi_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    state2 = torch.load(multi_dir / "weights.pt", weights_only=True)
    for name, v in state1.items():
        assert (v - state2[name]).abs().max().item() < 1e-10, name
    ranks = [json.loads((multi_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["stop"] is True
        assert r["token"] == {"from": 0}
        for h1, h2 in zip(history1, r["history"]):
            assert h2["count"] == h1["count"] == 19
            for k in ("loss", "grad_norm", "learning_rate", "token_accuracy"):
                assert h2[k] == pytest.approx(h1[k], rel=1e-10, abs=1e-12), k
    assert [p.name for p in (multi_dir / "checkpoints").iterdir()] == ["step-3"]
    assert json.loads((multi_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text()) == {"step": 3, "epoch": 1.0}
