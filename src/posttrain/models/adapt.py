"""What is trained and how it is saved: LoRA adapters (peft), layer freezing, atomic saving.

LoRA (Hu et al. 2021) adds a trainable low-rank update B @ A (scaled by alpha / r) beside each
frozen linear weight. Because the base weights never change, the reference model of DPO / PPO is
the same network with the adapter switched off (`reference_context`): no second copy in memory.

Freezing implements the transfer-learning recipe of the seed text: keep the pre-trained lower
layers fixed, train the top N transformer blocks plus the (new) head.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from posttrain.config import ConfigError, FreezeConfig, LoraConfig

_TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "seq_cls": "SEQ_CLS",
    "classification": "SEQ_CLS",
    "reward": "SEQ_CLS",
    "critic": "SEQ_CLS",
}
_HEAD_NAMES = ("score", "classifier")


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def apply_lora(model: nn.Module, lora_cfg: LoraConfig, task_type: str = "causal_lm") -> nn.Module:
    """Wrap `model` in a peft LoRA model; `lora_cfg.r == 0` returns the model unchanged.

    task_type: `causal_lm` or `seq_cls` (also `classification`, `reward`, `critic`). For a
    sequence classifier the (usually new) `score` head is fully trained and saved through
    `modules_to_save`: a random head cannot be expressed as a low-rank update.
    Whatever the base model's dtype, the trainable parameters (adapters, the head's trained copy) are
    float32: the base stays frozen in the compute dtype, and AdamW updates float32 weights only.
    """
    if lora_cfg.r <= 0:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    key = str(task_type).lower().removeprefix("tasktype.")
    if key not in _TASK_TYPES:
        raise ConfigError(f"unknown LoRA task type `{task_type}`; use causal_lm or seq_cls")
    peft_task = TaskType[_TASK_TYPES[key]]
    targets = lora_cfg.target_modules
    target_modules: str | list[str] = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    modules_to_save = None
    if peft_task == TaskType.SEQ_CLS:
        names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        modules_to_save = [n for n in _HEAD_NAMES if n in names]
        if isinstance(target_modules, list):
            target_modules = [t for t in target_modules if t not in modules_to_save]
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=target_modules,
        task_type=peft_task,
        modules_to_save=modules_to_save,
    )
    model = get_peft_model(model, peft_cfg)
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


@contextlib.contextmanager
def reference_context(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the LoRA model computes the frozen base model (the reference policy).

    Only valid for a peft model (possibly under DDP; calls still go through the wrapper): for
    full fine-tuning the reference must be a separate copy.
    """
    inner = model.module if isinstance(getattr(model, "module", None), nn.Module) else model  # under DDP
    if not is_peft_model(inner):
        raise ValueError("reference_context needs a LoRA (peft) model; with full fine-tuning load a separate reference model")
    with inner.disable_adapter():
        yield model


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the nn.ModuleList of same-class modules with the most parameters.

    Works for `model.layers` (Llama, Qwen, Mistral), `transformer.h` (GPT-2), `gpt_neox.layers`
    and peft-wrapped versions of them, without a table of architectures.
    """
    best, best_size = None, -1
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ValueError(f"{type(model).__name__}: found no stack of transformer blocks to freeze")
    return best


def _matches(name: str, patterns: list[str]) -> bool:
    """A module name matches a pattern by its last component (`norm` matches `model.norm` but not
    `model.layers.3.input_layernorm`) or as a glob over the full dotted name."""
    last = name.rsplit(".", 1)[-1]
    return any(last == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_freeze(model: nn.Module, freeze_cfg: FreezeConfig) -> nn.Module:
    """Train only the top `trainable_layers` blocks plus modules matching `freeze_cfg.extra`.

    -1 leaves every parameter as it is (all trainable); 0 trains only the `extra` modules (e.g. a
    new classification head: linear probing). With tied input/output embeddings, `lm_head` in
    `extra` also trains the input embedding (it is the same tensor).
    """
    n = freeze_cfg.trainable_layers
    if n < 0:
        return model
    blocks = transformer_blocks(model)
    if n > len(blocks):
        raise ConfigError(f"freeze.trainable_layers={n} but the model has {len(blocks)} transformer blocks")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[len(blocks) - n :]:
        for p in block.parameters():
            p.requires_grad_(True)
    for name, module in model.named_modules():
        if name and _matches(name, list(freeze_cfg.extra)):
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def _cast_state(model: nn.Module, state_dict: dict | None, dtype: torch.dtype) -> dict:
    """The model's weights (or `state_dict`) with floating tensors in `dtype`, on the CPU (where they are written
    from anyway; no second copy on the accelerator). A tied parameter (lm_head = embeddings) is kept under its
    first name only, as `save_pretrained` stores it: after the cast the two names no longer share memory."""
    state = state_dict if state_dict is not None else model.state_dict()
    seen, out = set(), {}
    for name, value in state.items():
        if state_dict is None and value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        out[name] = value.detach().to(device="cpu", dtype=dtype) if value.is_floating_point() else value
    return out


def save_model(model: nn.Module, folder: Path, *, dtype: torch.dtype | None = None, state_dict: dict | None = None) -> None:
    """`save_pretrained` of the model, its weights and config.json's `dtype` in `dtype` (None: as held).

    A PEFT adapter keeps its float32 weights (the PEFT convention; it loads onto a base of any dtype): only a
    whole model is cast."""
    if dtype is None or is_peft_model(model):
        model.save_pretrained(str(folder), safe_serialization=True,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
        return
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=_cast_state(model, state_dict, dtype))
    # save_pretrained writes the dtype the parameters are held in (float32 master weights); the file says what it holds
    config, held = model.config, model.config.dtype
    config.dtype = dtype
    config.save_pretrained(str(folder))
    config.dtype = held


def _write(model: nn.Module, tokenizer, folder: Path, merge_lora: bool, state_dict: dict | None = None,
           dtype: torch.dtype | None = None) -> None:
    save_model(model, folder, dtype=dtype, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    if merge_lora and is_peft_model(model):
        # merge_and_unload folds B @ A into the base weights in place; work on a copy so the
        # caller's model keeps its adapter (it may go on training).
        merged = copy.deepcopy(model).merge_and_unload()
        save_model(merged.to(dtype) if dtype is not None else merged, folder / "merged")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(folder / "merged"))


def save_pretrained_atomic(
    model: nn.Module,
    tokenizer,
    out_dir: str | Path,
    merge_lora: bool = False,
    extra: Callable[[Path], None] | None = None,
    state_dict: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a loadable HF folder to `out_dir` so that a crash never leaves a half-written one.

    Everything goes to a temporary sibling folder first (weights, tokenizer, the merged model
    under `merged/` with `merge_lora` and LoRA, then whatever `extra(tmp_dir)` writes); only a
    complete folder is renamed onto `out_dir`. An existing `out_dir` is replaced. `state_dict`: the weights to
    write instead of the model's own (an FSDP2-sharded model's gathered `engine.full_model_state`). `dtype`: the
    precision the weights are written in (the run's `dtype`; training holds float32 master weights), None: as held.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write(model, tokenizer, tmp, merge_lora, state_dict, dtype)
        if extra is not None:
            extra(tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
