"""Memory of the float32 master copy: bytes of parameters, gradients and AdamW state per training setup.

    .venv/bin/python bench/precision_memory.py                 # the formula at common sizes + a measured check
    .venv/bin/python bench/precision_memory.py --params 7.6e9  # the formula for one size

Per trained parameter (full fine-tuning, AdamW with two moments, no sharding):

    setup                              weights  grads  AdamW (m, v)  autocast copy  total
    float32                                  4      4             8              0     16
    bf16 compute, float32 master (dtype=bfloat16, posttrain)
                                             4      4             8              2     18
    pure bf16 storage (no master copy)       2      2             4              0      8

The autocast copy is the bf16 cast of each weight that torch.autocast caches for the forward and backward of one
step (freed at the end of the autocast region). The check builds a small Llama, runs one real AdamW step in each
setup (the posttrain optimizer, autocast as `train_step` uses it) and sums the bytes of the tensors that exist:
`model.parameters()`, their `.grad`, and every tensor in `optimizer.state`; it must equal the formula's
weights + grads + AdamW columns exactly. The autocast cache is not a tensor one can list; its size is the formula's.
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.engine.optim import adamw, param_groups

SETUPS = {  # name: (weights, grads, adam, autocast copy) bytes per parameter
    "float32": (4, 4, 8, 0),
    "bf16 compute + float32 master": (4, 4, 8, 2),
    "pure bf16": (2, 2, 4, 0),
}


def formula(n: float) -> dict[str, dict[str, float]]:
    return {name: {"weights": w * n, "grads": g * n, "adam": a * n, "autocast": c * n, "total": (w + g + a + c) * n}
            for name, (w, g, a, c) in SETUPS.items()}


def measured(name: str) -> tuple[int, dict[str, int]]:
    """(parameter count, bytes of weights / grads / AdamW state) after one real optimizer step."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if name == "pure bf16":
        model = model.to(torch.bfloat16)
    optimizer = adamw(param_groups(model, 0.0), 1e-5)
    ids = torch.randint(0, 512, (2, 16))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if name.startswith("bf16") else torch.autocast("cpu", enabled=False)
    with amp:
        loss = model(input_ids=ids, labels=ids).loss
    loss.float().backward()
    optimizer.step()
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    return sum(p.numel() for p in params), {
        "weights": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.grad.numel() * p.grad.element_size() for p in params),
        "adam": sum(t.numel() * t.element_size() for t in state),
    }


def gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="*", default=[0.5e9, 1.5e9, 7.6e9])
    args = parser.parse_args()
    print("| parameters | setup | weights GiB | grads GiB | AdamW GiB | autocast copy GiB | total GiB |")
    print("|---|---|---|---|---|---|---|")
    for n in args.params:
        for name, row in formula(n).items():
            print(f"| {n / 1e9:.1f}B | {name} | " + " | ".join(gib(row[k]) for k in ("weights", "grads", "adam",
                                                                                       "autocast", "total")) + " |")
    print()
    for name in SETUPS:
        n, got = measured(name)
        want = formula(n)[name]
        ok = all(got[k] == want[k] for k in got)
        print(f"measured {name}: {n} parameters, " + ", ".join(f"{k} {v} B" for k, v in got.items())
              + (" = formula" if ok else f" != formula {want}"))
        if not ok:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
