"""posttrain.models: load HF models and tokenizers, LoRA / freezing, forward passes, the tiny default."""

from posttrain.models.adapt import (
    apply_freeze,
    apply_lora,
    is_peft_model,
    reference_context,
    save_pretrained_atomic,
    transformer_blocks,
)
from posttrain.models.forward import (
    last_token_index,
    lm_head_weight,
    sequence_scores,
    sequence_scores_at,
    token_logprobs,
    token_logprobs_at,
    token_values,
    unwrap,
)
from posttrain.models.load import (
    CHATML_TEMPLATE,
    count_parameters,
    default_device,
    disable_dropout,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_dtype,
)

__all__ = [
    "CHATML_TEMPLATE",
    "apply_freeze",
    "apply_lora",
    "count_parameters",
    "default_device",
    "disable_dropout",
    "is_peft_model",
    "last_token_index",
    "lm_head_weight",
    "load_causal_lm",
    "load_sequence_classifier",
    "load_tokenizer",
    "reference_context",
    "resolve_dtype",
    "save_pretrained_atomic",
    "sequence_scores",
    "sequence_scores_at",
    "token_logprobs",
    "token_logprobs_at",
    "token_values",
    "transformer_blocks",
    "unwrap",
]
