"""Checkpoints: resume is bit-identical, saves are atomic, rotation keeps the newest."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from engine_helpers import VOCAB, collate, count_tokens, lm_loss_sum, tiny_llama
from torch import nn

from posttrain.config import ConfigError
from posttrain.engine import (
    Checkpointer,
    DistInfo,
    build_optimizer,
    build_scheduler,
    resolve_resume,
    train_step,
)
from posttrain.errors import TrainingError

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
CFG = SimpleNamespace(learning_rate=1e-2, weight_decay=0.01, lr_scheduler="cosine", warmup_ratio=0.25)
TOTAL = 4


def _random_batch() -> dict[str, torch.Tensor]:
    """Drawn from all three global generators, so a resume must restore each of them."""
    n = random.randint(3, 8)  # python
    seed = int(np.random.randint(0, 10_000))  # numpy
    ids = torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[: int(torch.randint(0, n - 1, ()))] = -100  # torch
    return collate([{"input_ids": ids, "labels": labels}])


def _setup(init_seed: int):
    # attention dropout draws from torch's generator during training too
    model = tiny_llama(init_seed, dtype=torch.float32, attention_dropout=0.2)
    model.train()
    opt = build_optimizer(model, CFG)
    return model, opt, build_scheduler(opt, CFG, TOTAL)


def _train(model, opt, sched, steps: int) -> None:
    for _ in range(steps):
        mbs = [_random_batch(), _random_batch()]
        train_step(model, mbs, lm_loss_sum, opt, sched, max_grad_norm=1.0, dist=ONE, count_fn=count_tokens)


def _seed(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """Run A: 4 steps. Run B: 2 steps, save, scramble every RNG and the weights, load, 2 more steps.
    Every weight, the optimizer moments and the scheduler's position match A exactly."""
    _seed(7)
    a = _setup(0)
    _train(*a, TOTAL)

    _seed(7)
    b = _setup(0)
    _train(*b, 2)
    ckpt = Checkpointer(tmp_path, keep=2)
    path = ckpt.save(2, model=b[0], optimizer=b[1], scheduler=b[2], extra={"epoch": 0.5, "data_position": 2})

    _seed(123)
    c = _setup(1)  # other init, fresh optimizer state
    extra = ckpt.load(path, model=c[0], optimizer=c[1], scheduler=c[2])
    assert extra == {"step": 2, "epoch": 0.5, "data_position": 2}
    assert c[2].last_epoch == 2
    _train(*c, TOTAL - 2)

    for (name, pa), pc in zip(a[0].named_parameters(), c[0].parameters()):
        assert torch.equal(pa, pc), name
    sa, sc = a[1].state_dict()["state"], c[1].state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sc[i]["exp_avg_sq"]) for i in sa)
    assert a[2].get_last_lr() == c[2].get_last_lr()


def test_tied_embeddings_round_trip(tmp_path):
    """save_pretrained writes the tied lm_head once; loading still fills (and keeps tied) both."""
    src = tiny_llama(0, dtype=torch.float32, tie_word_embeddings=True)
    dst = tiny_llama(1, dtype=torch.float32, tie_word_embeddings=True)
    path = Checkpointer(tmp_path).save(1, model=src)
    Checkpointer(tmp_path).load(path, model=dst)
    assert dst.lm_head.weight.data_ptr() == dst.model.embed_tokens.weight.data_ptr()
    for (name, p), q in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(p, q), name


def test_plain_module_round_trip(tmp_path):
    """A module without save_pretrained is stored as model.safetensors."""
    torch.manual_seed(0)
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    path = Checkpointer(tmp_path).save(5, model=src, extra={"epoch": 1})
    assert (path / "model.safetensors").is_file()
    assert Checkpointer(tmp_path).load(path, model=dst) == {"step": 5, "epoch": 1}
    assert torch.equal(src.weight, dst.weight) and torch.equal(src.bias, dst.bias)


def test_a_failed_save_leaves_no_step_folder_and_keeps_the_previous(tmp_path):
    """The extra of step 2 cannot be serialised; it is written last, after the weights, so the failure
    happens mid-save. No step-2 and no temp folder remain; step-1 is intact and still the latest."""
    model = nn.Linear(2, 2)
    ckpt = Checkpointer(tmp_path, keep=1)
    first = ckpt.save(1, model=model, extra={"epoch": 0})
    with pytest.raises(TrainingError, match="saving checkpoint .*step-2 failed: TypeError"):
        ckpt.save(2, model=model, extra={"bad": object()})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]
    assert ckpt.latest() == first
    assert (first / "trainer_state.json").is_file()


def test_a_killed_save_is_ignored_and_overwritten(tmp_path):
    """A kill leaves only `.tmp-step-3` (no step-3): latest() is still step-2; the next save of step 3 works."""
    model = nn.Linear(2, 2)
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(2, model=model)
    half = tmp_path / "checkpoints" / ".tmp-step-3"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest().name == "step-2"
    ckpt.save(3, model=model)
    ckpt.save(3, model=model, extra={"again": True})  # re-saving a step replaces it atomically too
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert ckpt.load(ckpt.latest(), model=model) == {"step": 3, "again": True}


def test_rotation_keeps_the_newest(tmp_path):
    """keep = 2 after saving steps 1, 2, 10, 11 (numeric, not lexical, order) -> step-10, step-11."""
    model = nn.Linear(2, 2)
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 10, 11):
        ckpt.save(step, model=model)
    assert [p.name for _, p in ckpt.steps()] == ["step-10", "step-11"]


def test_resolve_resume(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume("false", tmp_path) is None
    assert resolve_resume(False, tmp_path) is None
    ckpt = Checkpointer(tmp_path, keep=5)
    ckpt.save(3, model=nn.Linear(1, 1))
    last = ckpt.save(4, model=nn.Linear(1, 1))
    assert resolve_resume("auto", tmp_path) == last
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == last  # a run folder -> its latest
    assert resolve_resume(str(tmp_path / "checkpoints" / "step-3"), tmp_path).name == "step-3"
    with pytest.raises(ConfigError, match="`resume`"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
