"""FSDP2 smoke test of posttrain's engine on one GPU, for bench/gpu_check.sh.

    torchrun --standalone --nproc_per_node 1 bench/gpu_fsdp_smoke.py MODEL_DIR OUT_DIR

posttrain's recipes shard with FSDP2 only when there are several ranks (``wrap_model`` returns the model as is
for one process), so this drives the same pieces by hand on a one-rank NCCL group: ``fully_shard`` on every
transformer block and then the root (as ``posttrain.engine.dist.wrap_model(strategy="fsdp")`` does),
``posttrain.engine.step.train_step`` for a few SFT steps in bf16, ``Checkpointer.save`` (full state dict through
``torch.distributed.checkpoint``), then a fresh sharded model + optimizer resumed with ``Checkpointer.load``.
Passes when the resumed run's next losses and weights equal the uninterrupted run's. Prints one JSON line.
Without a GPU it runs the same on the CPU over gloo in float32 (a check of the script itself).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as torch_dist
from torch.distributed.fsdp import fully_shard

from posttrain.engine.checkpoint import Checkpointer, _full_state
from posttrain.engine.dist import DistInfo, _blocks, init_distributed, is_fsdp
from posttrain.engine.step import train_step
from posttrain.models.load import load_causal_lm, load_tokenizer

STEPS_BEFORE, STEPS_AFTER = 3, 2
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda", 0) if CUDA else torch.device("cpu")


def batches(vocab: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(4, vocab, (4, 96), generator=g)} for _ in range(n)]  # (B, T)


def loss_fn(model, mb):
    """Summed next-token NLL over the micro-batch (train_step divides by count_fn's total)."""
    ids = mb["input_ids"].to(DEVICE)  # (B, T)
    logits = model(input_ids=ids).logits.float()  # (B, T, V)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                             reduction="sum")


def sharded(model_dir: str, tok):
    model = load_causal_lm(model_dir, dtype="auto", device=DEVICE, tokenizer=tok)
    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    assert is_fsdp(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def run_steps(model, opt, data, dist) -> list[float]:
    out = []
    for mb in data:
        m = train_step(model, [mb], loss_fn, opt, None, max_grad_norm=1.0, dist=dist,
                       count_fn=lambda b: b["input_ids"][:, 1:].numel(),
                       autocast_dtype=torch.bfloat16 if CUDA else None)
        out.append(m["loss"])
    return out


def main() -> int:
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    if CUDA:
        torch.cuda.set_device(0)
        torch_dist.init_process_group("nccl", device_id=DEVICE)
    else:
        torch_dist.init_process_group("gloo")
    base = init_distributed()  # one rank: posttrain's own DistInfo (world size 1, so its collectives are no-ops)
    dist = DistInfo(rank=base.rank, world_size=1, local_rank=0, device=DEVICE, is_main=True)
    tok = load_tokenizer(model_dir)
    torch.manual_seed(0)
    model, opt = sharded(model_dir, tok)
    data = batches(len(tok), STEPS_BEFORE + STEPS_AFTER)
    first = run_steps(model, opt, data[:STEPS_BEFORE], dist)
    ckpt = Checkpointer(out_dir, keep=2)
    path = ckpt.save(STEPS_BEFORE, model=model, optimizer=opt)
    straight = run_steps(model, opt, data[STEPS_BEFORE:], dist)
    want, _ = _full_state(model, None)

    model2, opt2 = sharded(model_dir, tok)
    state = ckpt.load(path, model=model2, optimizer=opt2)
    resumed = run_steps(model2, opt2, data[STEPS_BEFORE:], dist)
    got, _ = _full_state(model2, None)
    max_diff = max(float((want[k].float() - got[k].float()).abs().max()) for k in want)
    ok = (int(state["step"]) == STEPS_BEFORE and all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(straight, resumed))
          and max_diff <= 1e-2 and all(x == x for x in first))
    print(json.dumps({"fsdp_ok": ok, "losses_before": first, "losses_straight": straight, "losses_resumed": resumed,
                      "max_weight_diff": max_diff, "checkpoint": str(path),
                      "device": str(DEVICE), "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if CUDA else None}))
    torch_dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
