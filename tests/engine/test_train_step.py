"""train_step: exact global token mean across accumulation, clipping, non-finite stop."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import SHAPES, collate, count_tokens, lm_loss_sum, sequences, tiny_llama
from torch import nn

from posttrain.engine import DistInfo, build_optimizer, build_scheduler, train_step
from posttrain.errors import TrainingError

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


class Scale(nn.Module):
    """y = w * x with one weight; per-element loss w * x so dL/dw is the mean of x."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


def linear_loss(model: Scale, xs: torch.Tensor):
    per_element = model.w * xs  # (n,)
    return per_element.sum(), {"x_mean": (xs.sum(), xs.numel()), "w_per_element": (model.w.detach() * xs.numel(), xs.numel())}


def test_loss_and_gradient_are_the_global_element_mean():
    """Micro-batches x = [1, 2] and [3], w = 0.5, per-element loss w * x.

    D = 3 elements; loss = (0.5 + 1.0 + 1.5) / 3 = 1.0; dL/dw = (1 + 2 + 3) / 3 = 2;
    SGD lr 0.1 -> w = 0.5 - 0.1 * 2 = 0.3. A mean of micro-batch means would give
    dL/dw = (1.5 + 3) / 2 = 2.25 -> w = 0.275.
    Stats: x_mean = 6 / 3 = 2; w_per_element = (0.5 * 2 + 0.5 * 1) / (2 + 1) = 0.5.
    """
    model = Scale(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mbs = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)]
    out = train_step(model, mbs, linear_loss, opt, None, max_grad_norm=0.0, dist=ONE, count_fn=lambda mb: mb.numel())
    assert out["loss"] == pytest.approx(1.0, abs=1e-15)
    assert out["grad_norm"] == pytest.approx(2.0, abs=1e-15)
    assert out["count"] == 3
    assert out["x_mean"] == pytest.approx(2.0, abs=1e-15)
    assert out["w_per_element"] == pytest.approx(0.5, abs=1e-15)
    assert model.w.item() == pytest.approx(0.3, abs=1e-15)
    assert model.w.grad is None  # zero_grad(set_to_none=True) after the step


def test_clipping_scales_the_update_and_reports_the_norm_before_clipping():
    """x = [1, 2, 3]: grad 2, max_grad_norm 0.5. torch clips by 0.5 / (2 + 1e-6), so the clipped grad is
    2 * 0.5 / (2 + 1e-6) = 0.49999975 and w = 0.5 - 0.1 * 0.49999975 = 0.450000025;
    the reported grad_norm is the pre-clip 2.0 and learning_rate the 0.1 used."""
    model = Scale(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mbs = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)]
    out = train_step(model, mbs, linear_loss, opt, None, max_grad_norm=0.5, dist=ONE, count_fn=lambda mb: mb.numel())
    assert out["grad_norm"] == pytest.approx(2.0, abs=1e-12)
    assert out["learning_rate"] == 0.1
    assert model.w.item() == pytest.approx(0.5 - 0.1 * 2 * 0.5 / (2 + 1e-6), abs=1e-15)


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_four_micro_steps_of_one_equal_one_step_of_four_on_a_llama():
    """Token counts per sequence are 2, 10, 4, 3 (D = 19). One SGD step on one micro-batch of 4 and
    on 4 micro-batches of 1 give the same weights (float64, 1e-10); the naive mean of the four
    per-sequence means (each sequence weighted 1/4 instead of n_i/19) gives different weights."""
    assert [n for _, n in SHAPES] == [2, 10, 4, 3]
    seqs = sequences(0)
    whole, split, naive = tiny_llama(0), tiny_llama(0), tiny_llama(0)
    for model, micro in ((whole, [collate(seqs)]), (split, [collate([s]) for s in seqs])):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        out = train_step(model, micro, lm_loss_sum, opt, None, max_grad_norm=0.0, dist=ONE, count_fn=count_tokens)
        assert out["count"] == 19
    assert (_weights(whole) - _weights(split)).abs().max().item() < 1e-10

    opt = torch.optim.SGD(naive.parameters(), lr=0.5)
    for s in seqs:
        mb = collate([s])
        loss_sum, _ = lm_loss_sum(naive, mb)
        (loss_sum / count_tokens(mb) / len(seqs)).backward()
    opt.step()
    assert (_weights(whole) - _weights(naive)).abs().max().item() > 1e-6


def test_accumulation_equivalence_holds_with_adamw_schedule_and_clipping():
    """Three steps of the real optimizer (AdamW, weight decay, linear schedule with warm-up, clipping at 0.5):
    4 x 1 and 1 x 4 stay equal to 1e-10 and report the same loss, grad_norm, learning_rate and stats."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(learning_rate=1e-2, weight_decay=0.1, lr_scheduler="linear", warmup_ratio=0.34)
    runs = []
    for split in (False, True):
        model = tiny_llama(0)
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg, total_steps=3)
        history = []
        for step in range(3):
            seqs = sequences(step)
            micro = [collate([s]) for s in seqs] if split else [collate(seqs)]
            history.append(train_step(model, micro, lm_loss_sum, opt, sched, max_grad_norm=0.5, dist=ONE, count_fn=count_tokens))
        runs.append((model, history))
    (a, ha), (b, hb) = runs
    assert (_weights(a) - _weights(b)).abs().max().item() < 1e-10
    for x, y in zip(ha, hb):
        assert set(x) == {"loss", "grad_norm", "learning_rate", "count", "token_accuracy"}
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-10, abs=1e-12)
    # W = ceil(0.34 * 3) = 2: lr(0) = 0, lr(1) = 1e-2 * 1/2, lr(2) = 1e-2 * (3 - 2) / (3 - 2)
    assert [h["learning_rate"] for h in ha] == pytest.approx([0.0, 0.5e-2, 1e-2])


def test_non_finite_loss_raises_and_leaves_the_weights_alone():
    """A NaN loss at the first step raises TrainingError naming step 1; w stays 0.5 and no grad is kept."""
    model = Scale(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def nan_loss(m: Scale, xs: torch.Tensor):
        return (m.w * xs * math.nan).sum(), {}

    with pytest.raises(TrainingError, match="step 1: the loss is nan"):
        train_step(model, [torch.ones(2, dtype=torch.float64)], nan_loss, opt, sched, max_grad_norm=1.0, dist=ONE, count_fn=len)
    assert model.w.item() == 0.5
    assert model.w.grad is None
    assert sched.last_epoch == 0


def test_infinite_gradient_raises():
    """loss = sqrt(w - 0.5) * sum(x) is finite (0) at w = 0.5 but its gradient 1 / (2 sqrt(0)) is inf."""
    model = Scale(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(m: Scale, xs: torch.Tensor):
        return torch.sqrt(m.w - 0.5) * xs.sum(), {}

    with pytest.raises(TrainingError, match="step 7: the gradient norm is inf"):
        xs = [torch.ones(2, dtype=torch.float64)]
        train_step(model, xs, loss, opt, None, max_grad_norm=1.0, dist=ONE, count_fn=len, step=7)
    assert model.w.item() == 0.5


def test_autocast_and_grad_scaler_path():
    """bfloat16 autocast (CPU here, CUDA in real runs) gives a float32 loss within bf16 rounding of the
    float32 one; with a GradScaler an overflowing step is skipped (weights kept) instead of raising."""
    torch.manual_seed(0)
    ref, amp = nn.Linear(8, 1), nn.Linear(8, 1)
    amp.load_state_dict(ref.state_dict())
    xs = [torch.randn(4, 8), torch.randn(2, 8)]

    def loss(m: nn.Linear, x: torch.Tensor):
        return (m(x) ** 2).sum(), {}

    outs = []
    for model, dtype in ((ref, None), (amp, torch.bfloat16)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        outs.append(train_step(model, xs, loss, opt, None, max_grad_norm=0.0, dist=ONE, count_fn=len, autocast_dtype=dtype))
    assert outs[1]["loss"] == pytest.approx(outs[0]["loss"], rel=2e-2)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = amp.weight.detach().clone()
    opt = torch.optim.SGD(amp.parameters(), lr=0.01)

    def overflow(m: nn.Linear, x: torch.Tensor):
        return (m(x) * 1e38).sum(), {}

    out = train_step(amp, xs[:1], overflow, opt, None, max_grad_norm=1.0, dist=ONE, count_fn=len, scaler=scaler)
    assert not math.isfinite(out["grad_norm"])
    assert torch.equal(amp.weight, before)
    assert scaler.get_scale() == 2.0**15  # halved after the skipped step


def test_a_bare_mean_or_a_bare_stat_is_refused():
    """A loss fn returning a bare mean (x = [1, 2, 3], w = 0.5: 1.0) would be divided by D = 3 again and train on
    1/3 of the loss; train_step refuses it, and a stat that is not a (sum, count) pair, before any update."""
    model = Scale(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)]
    with pytest.raises(TypeError, match=r"loss_fn must return \(loss_sum, stats\).*got a \(\) tensor"):
        train_step(model, xs, lambda m, x: (m.w * x).mean(), opt, None, max_grad_norm=0.0, dist=ONE, count_fn=len)
    with pytest.raises(TypeError, match="stat 'x_mean' must be a \\(sum, count\\) pair"):
        train_step(model, xs, lambda m, x: ((m.w * x).sum(), {"x_mean": x.mean()}), opt, None, max_grad_norm=0.0,
                   dist=ONE, count_fn=len)
    assert model.w.item() == 0.5


def test_stats_stay_on_the_device_and_sum_in_float64_as_python_floats_did():
    """The loss and stats are summed over micro-batches as float64 tensors and read back once per step; the numbers
    are those of summing Python floats (float64) as before. float32 sums of 1e8 and 1 would round 1e8 + 1 to 1e8;
    float64 keeps it. Micro-batches: loss sums 1e8 and 1 (float32), stat `big` given as a float32 tensor in one and a
    Python int in the other, counts as tensor and int: loss = (1e8 + 1) / 2, big = (1e8 + 1) / (1 + 1)."""
    model = nn.Linear(1, 1, bias=False)  # float32, weight 1: the loss sum is x
    nn.init.ones_(model.weight)

    def loss_fn(model, x):
        value = model(x[:, None]).sum()
        stat = x.sum() if x.numel() == 1 and float(x) > 1 else int(x.sum())
        count = torch.tensor(1) if isinstance(stat, torch.Tensor) else 1
        return value, {"big": (stat, count)}

    mbs = [torch.tensor([1e8]), torch.tensor([1.0])]
    out = train_step(model, mbs, loss_fn, torch.optim.SGD(model.parameters(), lr=0.0), None, max_grad_norm=0.0, dist=ONE,
                     count_fn=lambda mb: 1)
    assert out["loss"] == (1e8 + 1) / 2 and out["big"] == (1e8 + 1) / 2
