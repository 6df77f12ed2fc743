"""Optimizer groups, schedule values at hand-computed steps, run length."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import tiny_llama

from posttrain.config import ConfigError, SFTConfig
from posttrain.engine import build_optimizer, build_scheduler, total_steps_for
from posttrain.engine.optim import steps_per_epoch


def _lrs(kind: str, total: int, warmup_ratio: float, n: int) -> list[float]:
    """Learning rate used by each of the first n optimizer steps (peak 1.0)."""
    p = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = SimpleNamespace(learning_rate=1.0, weight_decay=0.0, lr_scheduler=kind, warmup_ratio=warmup_ratio)
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_with_warmup():
    """N = 10, warmup_ratio 0.2 -> W = 2. lr(s) = s/2 for s < 2, then (10 - s) / 8:
    s = 0..10 -> 0, 0.5, 1, 7/8, 6/8, 5/8, 4/8, 3/8, 2/8, 1/8, 0."""
    expected = [0, 0.5, 1, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    assert _lrs("linear", 10, 0.2, 11) == pytest.approx(expected, abs=1e-12)


def test_cosine_with_warmup():
    """N = 10, W = 2; after warm-up lr = 0.5 * (1 + cos(pi * (s - 2) / 8)):
    s = 2 -> 1; s = 4 -> 0.5 * (1 + cos(pi/4)) = 0.853553...; s = 6 -> 0.5; s = 8 -> 0.146446...; s = 10 -> 0."""
    lrs = _lrs("cosine", 10, 0.2, 11)
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[4] == pytest.approx(0.5 * (1 + math.sqrt(2) / 2), abs=1e-12)
    assert lrs[6] == pytest.approx(0.5, abs=1e-12)
    assert lrs[8] == pytest.approx(0.5 * (1 - math.sqrt(2) / 2), abs=1e-12)
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)


def test_constant_with_and_without_warmup():
    """N = 8, warmup 0.25 -> W = 2: 0, 0.5, then 1 forever; no warm-up: 1 from the first step."""
    assert _lrs("constant", 8, 0.25, 5) == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert _lrs("constant", 8, 0.0, 3) == [1.0, 1.0, 1.0]


def test_unknown_scheduler_names_the_key():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="`lr_scheduler` 'cosin'"):
        build_scheduler(opt, SimpleNamespace(lr_scheduler="cosin", warmup_ratio=0.0), 10)


def test_optimizer_covers_trainable_params_and_skips_decay_on_1d():
    """Freeze the embeddings: they are in no group. Matrices decay (0.1); the RMSNorm gains (1-D) do not."""
    model = tiny_llama(0, dtype=torch.float32)
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = build_optimizer(model, SimpleNamespace(learning_rate=3e-4, weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_groups == trainable
    assert id(model.model.embed_tokens.weight) not in in_groups
    # 2 layers x 2 norms + final norm = 5 gains
    assert len(no_decay["params"]) == 5
    assert opt.param_groups[0]["lr"] == 3e-4


def test_no_trainable_parameters_is_a_config_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, SimpleNamespace(learning_rate=1e-3, weight_decay=0.0))


def test_total_steps():
    """batch 4, grad_accum 2. One process: G = 8, ceil(100 / 8) = 13 steps per epoch (short last step kept);
    1.5 epochs -> ceil(19.5) = 20. Two processes: G = 16, floor(100 / 16) = 6 (the short chunk is dropped);
    1.5 epochs -> 9. max_steps = 5 wins."""
    cfg = SFTConfig(batch_size=4, grad_accum=2, num_epochs=1.5)
    assert steps_per_epoch(100, cfg, world_size=1) == 13
    assert total_steps_for(100, cfg, world_size=1) == 20
    assert steps_per_epoch(100, cfg, world_size=2) == 6
    assert total_steps_for(100, cfg, world_size=2) == 9
    cfg.max_steps = 5
    assert total_steps_for(100, cfg, world_size=2) == 5


def test_build_optimizer_is_fused_adamw_with_the_default_update():
    """build_optimizer takes torch's fused AdamW kernel on CPU float tensors, and its update is AdamW's: after three
    steps with weight decay on float64 weights every parameter sits where the per-parameter loop puts it (1e-12),
    and the 1-D parameters (no decay group) moved too."""
    model = tiny_llama().double()
    twin = tiny_llama().double()
    twin.load_state_dict(model.state_dict())
    cfg = SimpleNamespace(learning_rate=1e-2, weight_decay=0.1)
    fused = build_optimizer(model, cfg)
    assert all(g["fused"] for g in fused.param_groups)
    assert [g["weight_decay"] for g in fused.param_groups] == [0.1, 0.0]
    pairs = list(zip(model.parameters(), twin.parameters()))
    plain = torch.optim.AdamW([{"params": [b for a, b in pairs if a.ndim >= 2], "weight_decay": 0.1},
                               {"params": [b for a, b in pairs if a.ndim < 2], "weight_decay": 0.0}],
                              lr=1e-2, fused=False, foreach=False)
    start = [a.detach().clone() for a, _ in pairs]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in pairs:
            a.grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for (a, b), a0 in zip(pairs, start):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert not torch.equal(a, a0)
