"""Run by tests/engine/test_distributed.py under torchrun (2 gloo processes) and in-process (1).

Each of 3 optimizer steps uses the same 4-sequence global batch: with 2 ranks each rank takes
sequences rank::2 as 2 micro-batches of 1 (so the ranks hold different token counts); with one
process it is one micro-batch of 4. The exact normalisation makes both runs identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))

from engine_helpers import collate, count_tokens, lm_loss_sum, sequences, tiny_causal_lm  # noqa: E402

from posttrain.engine import (  # noqa: E402
    Checkpointer,
    StopSignal,
    broadcast_object,
    build_optimizer,
    build_scheduler,
    init_distributed,
    train_step,
    unwrap_parallel,
    wrap_model,
)

CFG = SimpleNamespace(learning_rate=1e-2, weight_decay=0.1, lr_scheduler="linear", warmup_ratio=0.0)
STEPS = 3


def run(out_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    dist = init_distributed()
    model = wrap_model(tiny_causal_lm(seed=0), dist)
    optimizer = build_optimizer(model, CFG)
    scheduler = build_scheduler(optimizer, CFG, total_steps=STEPS)
    history = []
    for step in range(STEPS):
        mine = sequences(step)[dist.rank :: dist.world_size]
        micro = [collate([s]) for s in mine] if dist.world_size > 1 else [collate(mine)]
        history.append(
            train_step(model, micro, lm_loss_sum, optimizer, scheduler, max_grad_norm=1.0, dist=dist, count_fn=count_tokens)
        )
    Checkpointer(out_dir, keep=1).save(STEPS, model=model, optimizer=optimizer, scheduler=scheduler, extra={"epoch": 1.0})
    return history, {k: v.detach().clone() for k, v in unwrap_parallel(model).state_dict().items()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    history, state = run(out)
    dist = init_distributed()
    with StopSignal() as stop:
        stop.requested = dist.rank == 1  # a signal that reached one rank only
        agreed = stop.should_stop(dist)
    token = broadcast_object({"from": dist.rank})
    if dist.rank == 0:
        torch.save(state, out / "weights.pt")
    (out / f"rank{dist.rank}.json").write_text(json.dumps({"history": history, "stop": agreed, "token": token}))
    torch.distributed.destroy_process_group()
