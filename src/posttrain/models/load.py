"""Load any Hugging Face causal LM, sequence classifier and tokenizer, local folder or hub id.

One code path serves the embedded tiny model and a hub model. The tokenizer is normalised so the
rest of posttrain can rely on three things (docs/internals.md, "Conventions"):

- a chat template is present (the tokenizer's own, else ChatML);
- `eos_token_id` is the token the model must learn to emit at the end of an assistant turn
  (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, ...), read off the chat template;
- a pad token exists and is not the EOS, so padding masks never hide the stop token.

The attention implementation comes from the `attn_implementation` key, checked against what transformers says the
model class supports (`choose_attention`) before any weight is read; SDPA gets posttrain's packed variant
(`forward.packed_sdpa`), registered under its own name when the first such model loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.dynamic_module_utils import get_class_from_dynamic_module
from transformers.models.auto.auto_factory import _get_model_class
from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

from posttrain.config import ConfigError
from posttrain.models.forward import packed_sdpa

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PAD_TOKEN = "<|pad|>"
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flex_attention")
_SUPPORT_FLAG = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}

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


def _remote_code_error(path, what: str) -> ConfigError:
    return ConfigError(f"model `{path}`: its {what} is custom Python code shipped with the model (`auto_map`); "
                       "set `trust_remote_code: true` to run it, if you trust its source")


def _config_folder(path: str | Path) -> str:
    """Where the model's config.json is: the folder itself, or the base model of a LoRA adapter folder."""
    folder = Path(str(path)).expanduser()
    if not folder.is_dir() or (folder / "config.json").is_file():
        return str(path)
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base:
            return str(base)
        raise ConfigError(f"model `{path}`: adapter_config.json names no base model (base_model_name_or_path)")
    raise ConfigError(f"model `{path}`: the folder has no config.json, so it is not a Hugging Face model folder "
                      f"(it holds: {', '.join(sorted(p.name for p in folder.iterdir())[:8]) or 'nothing'})")


def load_model_config(path: str | Path, *, trust_remote_code: bool = False):
    """AutoConfig of a model folder (or a LoRA adapter folder's base model) or hub id; an error naming the folder
    when there is no config.json, an architecture transformers does not know, or custom code not trusted."""
    check_model_source(path)
    source = _config_folder(path)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise _remote_code_error(path, "configuration") from None
        raise ConfigError(f"model `{path}`: config.json: {e}") from None


def model_class(auto_class, config, path: str | Path, *, trust_remote_code: bool = False) -> type:
    """The class `auto_class.from_pretrained` would build for `config`, found without loading weights: the model's
    own code (`auto_map`) when trusted, else transformers' mapping; an error naming the folder when there is none."""
    ref = (getattr(config, "auto_map", None) or {}).get(auto_class.__name__)
    if ref is not None and trust_remote_code:
        return get_class_from_dynamic_module(ref, _config_folder(path))
    if type(config) in auto_class._model_mapping:
        return _get_model_class(config, auto_class._model_mapping)
    if ref is not None:
        raise _remote_code_error(path, auto_class.__name__ + " class")
    kind = "causal-LM" if auto_class is AutoModelForCausalLM else "sequence-classification"
    raise ConfigError(f"model `{path}`: architecture `{config.model_type}` ({type(config).__name__}) has no "
                      f"{kind} class in transformers ({auto_class.__name__}); posttrain trains causal LMs and "
                      "sequence classifiers")


def choose_attention(cls: type, choice: str | None, path: str | Path, device: torch.device) -> str:
    """The `attn_implementation` key resolved for model class `cls`, refused by name when it cannot run.

    `auto`: SDPA where the class supports it (transformers' `_supports_sdpa`), else eager (Gemma 2, whose attention
    softcap SDPA cannot apply) -- transformers' own default. An explicit choice must be supported by the class
    (its `_supports_*` flag) and installed. SDPA comes back as `forward.PACKED_SDPA` for classes that dispatch through
    transformers' attention interface, so a packed batch runs padding-free on it.
    """
    choice = choice or "auto"
    if choice not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"`attn_implementation` must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {choice!r}")
    name = cls.__name__
    if choice == "auto":
        choice = "sdpa" if cls._supports_sdpa else "eager"
    flag = _SUPPORT_FLAG.get(choice)
    supported = flag is None or getattr(cls, flag, False) or (choice == "flash_attention_2"
                                                              and getattr(cls, "_supports_flash_attn_2", False))
    if not supported:
        raise ConfigError(f"model `{path}`: `attn_implementation: {choice}` is not supported by {name} "
                          f"(transformers' {name}.{flag} is False); use auto or eager")
    if choice == "flash_attention_2" and (device.type != "cuda" or not is_flash_attn_2_available()):
        raise ConfigError(f"model `{path}`: `attn_implementation: flash_attention_2` needs a CUDA GPU and the "
                          "flash_attn package, which this environment lacks; use auto or sdpa")
    if choice == "flex_attention" and not is_torch_flex_attn_available():
        raise ConfigError(f"model `{path}`: `attn_implementation: flex_attention` needs torch >= 2.5 "
                          f"(found {torch.__version__}); use auto or sdpa")
    if choice == "flex_attention" and device.type == "cpu":
        raise ConfigError(f"model `{path}`: `attn_implementation: flex_attention` needs a GPU (torch's FlexAttention "
                          "has no backward pass on CPU); use auto or sdpa")
    if choice == "sdpa" and cls._can_set_attn_implementation():
        return packed_sdpa()
    return choice


def _check_chat_template(tok, path, chat_template: str) -> None:
    """A user/assistant conversation must render with both texts in it: every chat row goes through the template,
    so a broken one is refused here, before training, rather than row by row."""
    where = f"model `{path}`: the tokenizer's chat template" if chat_template == "auto" else \
        f"model `{path}`: the chat template given by `data.chat_template`"
    turns = [{"role": "user", "content": "Zq7xUserTextZq7x"}, {"role": "assistant", "content": "Zq7xAssistantTextZq7x"}]
    try:
        text = tok.apply_chat_template(turns, tokenize=False)
        tok.apply_chat_template(turns[:1], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's errors and the template's own raise_exception alike
        raise ConfigError(f"{where} cannot render a user/assistant conversation ({type(e).__name__}: {e}); "
                          "set `data.chat_template` to chatml or a Jinja template that can") from None
    missing = [t["role"] for t in turns if not isinstance(text, str) or t["content"] not in text]
    if missing:
        raise ConfigError(f"{where} drops the {' and '.join(missing)} message text when rendering a conversation; "
                          "set `data.chat_template` to chatml or a Jinja template that renders every message")


def load_tokenizer(path: str | Path, chat_template: str = "auto", *, trust_remote_code: bool = False):
    """AutoTokenizer from a hub id or folder, with a chat template, a turn-ending EOS and a pad != EOS.

    chat_template: `auto` (the tokenizer's own, else ChatML), `chatml`, or a Jinja template string; it must
    render a user/assistant conversation. Adds `<|im_start|>` / `<|im_end|>` when ChatML is imposed on a
    vocabulary without them, and `<|pad|>` when no unused pad-like special token exists; then `len(tok)` exceeds
    the model's embedding rows and `load_causal_lm(..., tokenizer=tok)` resizes them.
    """
    check_model_source(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise _remote_code_error(path, "tokenizer") from None
        raise
    if chat_template == "chatml" or (chat_template == "auto" and not tok.chat_template):
        tok.chat_template = CHATML_TEMPLATE
    elif chat_template != "auto":
        tok.chat_template = chat_template
    _check_chat_template(tok, path, chat_template)
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
            # The end-of-turn token first; stop ids the folder already lists (Llama 3: <|end_of_text|>, <|eom_id|>)
            # stay, so `generate` on the saved model stops where the original did.
            listed = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
            stops = [tokenizer.eos_token_id] + [i for i in listed if i is not None and i != tokenizer.eos_token_id]
            gen.eos_token_id = stops if len(stops) > 1 else stops[0]
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
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    tokenizer=None,
    keep_float32: bool = False,
):
    """AutoModelForCausalLM from a hub id, a folder or a LoRA adapter folder; attention per `choose_attention`.

    Pass the tokenizer from `load_tokenizer` so added tokens get embedding rows and the config's
    pad / eos ids match it. `keep_float32`: hold the weights in float32 whatever `dtype` says (a model to train
    or to compare with one, `weights_dtype`); without it they are loaded in `dtype`.
    """
    device = torch.device(device) if device is not None else default_device()
    config = load_model_config(path, trust_remote_code=trust_remote_code)
    cls = model_class(AutoModelForCausalLM, config, path, trust_remote_code=trust_remote_code)
    attn = choose_attention(cls, attn_implementation, path, device)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=weights_dtype(dtype, device, keep_float32), attn_implementation=attn,
        trust_remote_code=trust_remote_code,
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
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
    tokenizer=None,
    keep_float32: bool = False,
):
    """AutoModelForSequenceClassification; a causal-LM folder gets a new randomly initialised head.

    `num_labels=1` is a reward model / critic. The head reads the last non-pad token, which
    transformers finds through `config.pad_token_id`, so it is always set (from `tokenizer`, or
    from the folder's own tokenizer when not given). `keep_float32` as in `load_causal_lm`.
    """
    device = torch.device(device) if device is not None else default_device()
    config = load_model_config(path, trust_remote_code=trust_remote_code)
    attn = choose_attention(model_class(AutoModelForSequenceClassification, config, path,
                                        trust_remote_code=trust_remote_code), attn_implementation, path, device)
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
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    # The pad id may be a token the tokenizer just added; `_finish` sets it after the resize.
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), config=config, dtype=weights_dtype(dtype, device, keep_float32), attn_implementation=attn,
        trust_remote_code=trust_remote_code,
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
