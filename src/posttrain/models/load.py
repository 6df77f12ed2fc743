"""Load any Hugging Face causal LM, sequence classifier and tokenizer, local folder or hub id.

One code path serves the embedded tiny model and a hub model. The tokenizer is normalised so the
rest of posttrain can rely on three things (docs/internals.md, "Conventions"):

- a chat template is present (the tokenizer's own, else ChatML);
- `eos_token_id` is the token the model must learn to emit at the end of an assistant turn
  (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, ...), read off the chat template;
- a pad token exists and is not the EOS, so padding masks never hide the stop token.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.config import ConfigError

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PAD_TOKEN = "<|pad|>"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def default_device() -> torch.device:
    """cuda:LOCAL_RANK when a GPU is visible (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(name: str | torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """The compute and saved precision a `dtype` key names (README, "Precision"): `auto` -> bfloat16 on a CUDA GPU
    that supports it, else float32; or an explicit name."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key == "auto":
        dev = torch.device(device) if device is not None else default_device()
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype `{name}`; use auto, float32, bfloat16 or float16")
    return _DTYPES[key]


# --------------------------------------------------------------------------- tokenizer


def _special_strings(tok) -> set[str]:
    """Every token string the tokenizer treats as special (named ones and added special tokens)."""
    names = set(tok.all_special_tokens)
    names.update(t.content for t in tok.added_tokens_decoder.values() if t.special)
    return names


def _end_of_turn_token(tok) -> str | None:
    """The special token the chat template writes right after an assistant message's text.

    Rendering a two-turn conversation and reading what follows the assistant content finds
    `<|im_end|>` (ChatML), `<|eot_id|>` (Llama 3), `<end_of_turn>` (Gemma) or `</s>` without
    a table of model families.
    """
    marker = "Zq7xAssistantTextZq7x"
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that needs other roles or fields: keep the tokenizer's EOS
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    rest = text.split(marker, 1)[1]
    for name in sorted(_special_strings(tok), key=len, reverse=True):
        if name and rest.startswith(name):
            return name
    return None


def _pick_pad_token(tok) -> str | None:
    """An existing special token named like a pad token that is neither EOS, BOS nor a chat marker."""
    taken = {tok.eos_token, tok.bos_token, "<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    for name in sorted(_special_strings(tok)):
        if "pad" in name.lower() and name not in taken:
            return name
    return None


def check_model_source(path: str | Path) -> None:
    """A model must be an existing local folder or something that can be a hub id (`name` or `org/name`);
    say which key to fix instead of letting the hub client fail on a mistyped local path."""
    text = str(path)
    if Path(text).expanduser().exists():
        return
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or not text:
        raise ConfigError(f"model `{text}`: no such folder (and not a hub id of the form name or org/name)")


def load_tokenizer(path: str | Path, chat_template: str = "auto"):
    """AutoTokenizer from a hub id or folder, with a chat template, a turn-ending EOS and a pad != EOS.

    chat_template: `auto` (the tokenizer's own, else ChatML), `chatml`, or a Jinja template string.
    Adds `<|im_start|>` / `<|im_end|>` when ChatML is imposed on a vocabulary without them, and
    `<|pad|>` when no unused pad-like special token exists; then `len(tok)` exceeds the model's
    embedding rows and `load_causal_lm(..., tokenizer=tok)` resizes them.
    """
    check_model_source(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    if chat_template == "chatml" or (chat_template == "auto" and not tok.chat_template):
        tok.chat_template = CHATML_TEMPLATE
    elif chat_template != "auto":
        tok.chat_template = chat_template
    template = tok.chat_template if isinstance(tok.chat_template, str) else str(tok.chat_template)
    if "<|im_end|>" in template and tok.convert_tokens_to_ids("<|im_end|>") in (None, tok.unk_token_id):
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, replace_extra_special_tokens=False)

    end_of_turn = _end_of_turn_token(tok)
    if end_of_turn is not None and end_of_turn != tok.eos_token:
        # The model must learn to stop at the end of its turn; generation stops at eos_token_id.
        tok.eos_token = end_of_turn

    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        why = "has no pad token" if tok.pad_token is None else f"pads with its EOS `{tok.eos_token}`"
        existing = _pick_pad_token(tok)
        if existing is not None:
            tok.pad_token = existing
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
        # Said in the run's log: a pad that were the EOS would mask the stop token out of the labels.
        how = "its own special token" if existing is not None else "a new token (the embeddings grow by one row)"
        print(f"tokenizer {path} {why}: padding with `{tok.pad_token}` (id {tok.pad_token_id}), {how}; "
              f"EOS stays `{tok.eos_token}` (id {tok.eos_token_id})", flush=True)
    if tok.pad_token_id == tok.eos_token_id:
        raise ConfigError(f"{path}: could not give the tokenizer a pad token distinct from EOS `{tok.eos_token}`")
    return tok


# --------------------------------------------------------------------------- models


def _finish(model, tokenizer, device, gradient_checkpointing: bool):
    """Resize for added tokens, record pad/eos ids, move to the device."""
    if tokenizer is not None:
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            # New rows start at the mean embedding (transformers' mean_resizing), so the new pad /
            # chat tokens do not perturb the initial distribution (Hewitt 2021).
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = tokenizer.pad_token_id
            gen.eos_token_id = tokenizer.eos_token_id
    if gradient_checkpointing:
        # Non-reentrant checkpointing of every GradientCheckpointingLayer: each layer's call keeps its input and
        # keyword arguments and runs again in the backward pass, so a packed batch's per-sequence attention
        # (`forward._sdpa_or_varlen`, dispatched on a keyword argument) is recomputed as it ran.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 (the older name is deprecated)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.to(device)


def weights_dtype(dtype: str | torch.dtype, device: torch.device, keep_float32: bool) -> torch.dtype:
    """The dtype parameters are held in: float32 with `keep_float32`, else the compute dtype.

    A model that is trained keeps float32 weights (AdamW's update of a bf16 weight of 0.02 rounds away below
    ~6e-5, its rounding step being ~1.2e-4), and so does a frozen model compared with it (a reference, an EMA),
    so that both run the same arithmetic; the compute precision then comes from autocast (`engine.autocast_dtype`).
    """
    return torch.float32 if keep_float32 else resolve_dtype(dtype, device)


def load_causal_lm(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    tokenizer=None,
    keep_float32: bool = False,
):
    """AutoModelForCausalLM from a hub id or folder; SDPA attention unless told otherwise.

    Pass the tokenizer from `load_tokenizer` so added tokens get embedding rows and the config's
    pad / eos ids match it. `keep_float32`: hold the weights in float32 whatever `dtype` says (a model to train
    or to compare with one, `weights_dtype`); without it they are loaded in `dtype`.
    """
    device = torch.device(device) if device is not None else default_device()
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=weights_dtype(dtype, device, keep_float32), attn_implementation=attn_implementation or "sdpa"
    )
    return _finish(model, tokenizer, device, gradient_checkpointing)


def load_sequence_classifier(
    path: str | Path,
    *,
    num_labels: int,
    id2label: dict[int, str] | list[str] | None = None,
    dtype: str | torch.dtype = "auto",
    device: torch.device | str | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    tokenizer=None,
    keep_float32: bool = False,
):
    """AutoModelForSequenceClassification; a causal-LM folder gets a new randomly initialised head.

    `num_labels=1` is a reward model / critic. The head reads the last non-pad token, which
    transformers finds through `config.pad_token_id`, so it is always set (from `tokenizer`, or
    from the folder's own tokenizer when not given). `keep_float32` as in `load_causal_lm`.
    """
    device = torch.device(device) if device is not None else default_device()
    config = AutoConfig.from_pretrained(str(path))
    if isinstance(id2label, (list, tuple)):
        id2label = dict(enumerate(id2label))
    if id2label is not None:
        if len(id2label) != num_labels:
            raise ConfigError(f"{len(id2label)} label names given for num_labels={num_labels}")
        config.id2label = {int(k): str(v) for k, v in id2label.items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    elif getattr(config, "num_labels", None) != num_labels:
        config.num_labels = num_labels
    if tokenizer is None and config.pad_token_id is None:
        tokenizer = load_tokenizer(path)
    # The pad id may be a token the tokenizer just added; `_finish` sets it after the resize.
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), config=config, dtype=weights_dtype(dtype, device, keep_float32),
        attn_implementation=attn_implementation or "sdpa",
    )
    return _finish(model, tokenizer, device, gradient_checkpointing)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (modules, attention-dropout attributes, config keys).

    RL losses compare log-probs of the same tokens under two forward passes (policy vs old
    policy, policy vs reference); dropout noise would make the ratio != 1 at step 0.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in list(vars(config).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
