"""How a model turns its final hidden states into its own logits: the one place every log-prob goes through.

transformers' causal LMs run `lm_head` and then, for some families, a post-head transform that sampling sees:
Granite (and MiniCPM3, whose division comes just before the head, the same by linearity) divide by
`config.logits_scaling`, Cohere multiplies by `config.logit_scale`, Falcon-H1 by `config.lm_head_multiplier`,
Gemma 2 / Gemma 3 cap with tanh(z / cap) * cap (`config.final_logit_softcapping`). `LogitHead` states that transform
so the chunked log-prob path (`losses.logprobs_from_hidden`) can apply it without building (B, T, V) logits.

A family this table does not know is caught by `logit_head`'s self-check: one forward pass over a few tokens
compares the chunked head against the model's own logits. On a mismatch the model is marked to use its own forward
logits (correct, more memory), and the run's log says so once per model class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# float32 forward vs the same matmul: differences are rounding (~1e-6); a missed scale or cap is far larger.
_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_TOLERANCE = 3e-2  # bf16 keeps 8 bits of mantissa; the transform's rounding differs between the two orders
_CHECK_TOKENS = 12
_ANNOUNCED: set[str] = set()


@dataclass(frozen=True)
class LogitHead:
    """logits = softcap(scale * (hidden @ weight.T)), then / temperature by the caller.

    `own_forward`: the self-check found the model's logits differ from that formula; use `model(...).logits`.
    """

    scale: float = 1.0
    softcap: float | None = None
    own_forward: bool = False


def head_from_config(config) -> LogitHead:
    """The post-head transform that the families transformers ships read from their config."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "lm_head_multiplier", None) is not None:  # Falcon-H1: logits * lm_head_multiplier
        scale *= float(config.lm_head_multiplier)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 / 3: tanh(z / cap) * cap
    return LogitHead(scale=scale, softcap=float(softcap) if softcap else None)


def apply_head(logits: torch.Tensor, head: LogitHead) -> torch.Tensor:
    """The family's post-head transform on raw `hidden @ weight.T` logits (any shape, float32 in practice)."""
    if head.scale != 1.0:
        logits = logits * head.scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def _output_weight(model: nn.Module) -> torch.Tensor | None:
    """The (V, D) weight of a plain linear LM head, or None when the head is something else (a bias, LoRA, ...)."""
    head = model.get_output_embeddings()
    if head is None or hasattr(head, "base_layer") or getattr(head, "bias", None) is not None:
        return None
    weight = getattr(head, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _agrees(model: nn.Module, head: LogitHead) -> bool:
    """One forward pass over a few tokens: do the model's own logits equal apply_head(hidden @ weight.T)?

    The hidden states and the logits come from the same call, so dropout in train mode cannot make them differ.
    """
    weight = _output_weight(model)
    if weight is None:
        return False
    vocab = weight.shape[0]
    device = weight.device
    ids = ((torch.arange(_CHECK_TOKENS, device=device) * 7919 + 3) % vocab)[None]  # (1, n): spread over the vocab
    caught = []
    backbone = model.base_model if model.base_model is not model else None
    hook = backbone.register_forward_hook(lambda _m, _a, out: caught.append(out[0])) if backbone is not None else None
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                        output_hidden_states=backbone is None)
    finally:
        if hook is not None:
            hook.remove()
    hidden = caught[-1] if caught else out.hidden_states[-1]  # (1, n, D)
    if getattr(out, "logits", None) is None or out.logits.shape[-1] != vocab:
        return False
    # read again after the forward: under FSDP2 the weight read before it is a shard (a DTensor), and the root
    # module's parameters stay gathered after its forward
    weight = _output_weight(model)
    ours = apply_head((hidden @ weight.T).float(), head)  # (1, n, V)
    theirs = out.logits.float()
    tol = _CHECK_TOLERANCE.get(out.logits.dtype, _HALF_TOLERANCE)
    scale = max(1.0, float(theirs.abs().max()))
    return bool(((ours - theirs).abs() <= tol * scale).all())


def logit_head(model: nn.Module) -> LogitHead:
    """The model's `LogitHead` (the unwrapped transformers model), self-checked once and remembered on the model.

    The answer is kept as an attribute of the model, so a `copy.deepcopy` (a reference model) carries it.
    """
    cached = getattr(model, "_posttrain_logit_head", None)
    if isinstance(cached, LogitHead):
        return cached
    head = head_from_config(model.config)
    if not _agrees(model, head):
        head = LogitHead(own_forward=True)
        name = type(model).__name__
        if name not in _ANNOUNCED:
            _ANNOUNCED.add(name)
            print(f"model: {name}'s logits are not lm_head(hidden) with a known post-head transform; log-probs use "
                  "the model's own full logits (correct, more memory)", flush=True)
    model._posttrain_logit_head = head
    return head
