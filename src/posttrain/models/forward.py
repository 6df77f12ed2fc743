"""Forward passes the losses need: per-token log-probs, per-token values, per-sequence scores.

Each runs the model's own top-level forward (so DDP and peft wrappers see the call and LoRA is
active) and takes the final, normed hidden states from it; the vocabulary projection is then done
in chunks by `logprobs_from_hidden`, so a full (B, T, V) float32 logit tensor never exists. The family's
post-head transform (scaling, softcap) comes from `models.head.logit_head`; a model whose logits are not
lm_head(hidden) with a known transform takes its own full logits instead.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from posttrain.data.collate import positions_from_mask
from posttrain.losses.logprobs import entropy_from_logits, logprobs_from_hidden, selective_log_softmax
from posttrain.models.head import logit_head


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / peft wrappers (LoRA layers stay injected in it)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DistributedDataParallel
            model = model.module
        else:
            return model


def _varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Causal attention within each packed sequence, one SDPA call per sequence (`_final_hidden`).

    query (B, H, T, d), key/value (B, H_kv, T, d); `posttrain_segments`: (row, start, end) spans covering every
    row. The same numbers as a block-diagonal mask, without the T x T mask and with the kernel's causal skip:
    sum n_i^2 / 2 scores instead of B * T^2. Returns (B, T, H, d) like transformers' sdpa_attention_forward.
    """
    gqa = query.shape[1] != key.shape[1]
    rows = [[] for _ in range(query.shape[0])]
    for row, start, end in kwargs["posttrain_segments"]:
        rows[row].append(torch.nn.functional.scaled_dot_product_attention(
            query[row: row + 1, :, start:end], key[row: row + 1, :, start:end], value[row: row + 1, :, start:end],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa))  # (1, H, n, d)
    out = torch.cat([torch.cat(pieces, dim=2) for pieces in rows])  # (B, H, T, d)
    return out.transpose(1, 2).contiguous(), None


def _sdpa_or_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' "sdpa" attention, or `_varlen_attention` when the call carries `posttrain_segments`.

    Registered under its own name, `PACKED_SDPA` (`packed_sdpa`), which only the models posttrain loads with SDPA
    carry: without the segments (every call except `_final_hidden`'s packed ones) this is exactly transformers'
    function. The segments travel as a keyword argument, which transformers' `GradientCheckpointingLayer` stores
    with the layer call and replays in the backward pass, so the recomputation runs the same per-sequence attention
    as the forward. A softcap goes to transformers' function, which refuses it as it would under "sdpa".
    """
    if kwargs.get("posttrain_segments") is None or kwargs.get("softcap") is not None:
        kwargs.pop("posttrain_segments", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _varlen_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


PACKED_SDPA = "posttrain_sdpa"


def packed_sdpa() -> str:
    """Register `_sdpa_or_varlen` under `PACKED_SDPA` (with transformers' SDPA mask builder, so padded and custom
    masks are built as for "sdpa") and return the name to load a model with.

    Called when a model is loaded, never on import, and under a name of its own: transformers' "sdpa" stays its own
    function for every other model in the process. The name contains "sdpa", so transformers runs its SDPA support
    check on it, and `save_pretrained` does not write it: a saved config.json carries no attention setting.
    """
    if ALL_ATTENTION_FUNCTIONS.get(PACKED_SDPA) is not _sdpa_or_varlen:
        AttentionInterface.register(PACKED_SDPA, _sdpa_or_varlen)
        AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def attention_name(model: nn.Module) -> str | None:
    """The model's attention implementation as transformers names it ("sdpa" also for `PACKED_SDPA`)."""
    name = getattr(unwrap(model).config, "_attn_implementation", None)
    return "sdpa" if name == PACKED_SDPA else name


def packing_layout(model: nn.Module) -> str:
    """How a packed batch (`_final_hidden`) runs on this model's attention, in words for the run's log."""
    name = unwrap(model).config._attn_implementation
    window = getattr(unwrap(model).config, "sliding_window", None)
    if name == PACKED_SDPA:
        text = "padding-free: causal SDPA per packed sequence"
        if window is not None:
            text += f"; a row with a sequence longer than the sliding window ({window}) takes the block-diagonal mask"
        return text
    if name and name.startswith("flash_attention"):
        return f"{name}: variable-length attention per packed sequence, found from the position resets"
    if name == "flex_attention":
        return "flex_attention: a block-diagonal BlockMask built from the position resets"
    return f"{name}: the block-diagonal (T x T) mask transformers builds from the position resets"


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of each packed sequence: a sequence starts where its position id is 0."""
    width = position_ids.shape[-1]
    starts = (position_ids == 0).nonzero().tolist()  # [[row, t], ...] in row-major order
    spans = []
    for k, (row, start) in enumerate(starts):
        nxt = starts[k + 1] if k + 1 < len(starts) else None
        spans.append((row, start, nxt[1] if nxt is not None and nxt[0] == row else width))
    return spans


def _final_hidden(model: nn.Module, input_ids, attention_mask, position_ids, **kwargs) -> torch.Tensor:
    """Final hidden states (B, T, D) after the last norm, from one call of the model's forward.

    The model's backbone (`base_model`) output is caught by a forward hook, so the top-level forward runs
    (wrappers see it) without keeping every layer's hidden state. A packed batch (no attention mask, positions
    restarting at 0 at each sequence, every row starting one) on SDPA attention runs padding-free: causal attention
    per sequence (`_sdpa_or_varlen`), the same numbers as the block-diagonal mask, with or without gradient
    checkpointing. It passes an all-ones (B, T) mask so that transformers builds no (T x T) mask for it (SDPA's
    causal flag stands in; the per-sequence attention ignores it). Other attention implementations (a model loaded
    with plain "sdpa" too) and a sliding window shorter than a sequence take what `packing_layout` says.
    """
    inner = unwrap(model)
    config = inner.config
    packed = (attention_mask is None and position_ids is not None and bool((position_ids[:, 0] == 0).all())
              and config._attn_implementation == PACKED_SDPA)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    if packed:
        segments = _segments(position_ids)
        window = getattr(config, "sliding_window", None)
        packed = window is None or max(end - start for _, start, end in segments) <= window
    if packed:
        kwargs["posttrain_segments"] = segments
        attention_mask = torch.ones_like(input_ids)  # (B, T): no padding, so no (T x T) mask
    if inner.base_model is inner:  # no separate backbone to hook: ask for the hidden states
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    output_hidden_states=True, **kwargs)
        return out.hidden_states[-1]  # (B, T, D); transformers ties it to the final-norm output
    caught = []
    hook = inner.base_model.register_forward_hook(lambda _m, _args, out: caught.append(out[0]))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs)
    finally:
        hook.remove()
    return caught[-1]  # (B, T, D): the backbone's last_hidden_state, after the final norm


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The (V, D) output projection; with tied embeddings this is the input embedding matrix."""
    head = unwrap(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "base_layer"):
        raise ValueError("LoRA on lm_head is not supported by token_logprobs; leave lm_head out of lora.target_modules")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(unwrap(model)).__name__}: an lm_head with a bias is not supported")
    return head.weight


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 1024,
    start: int = 0,
):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) at position t, shape (B, T-1), float32.

    Values at pad positions are whatever the model computes there; callers mask them.
    `temperature` divides the logits (the sampler's distribution). With `return_entropy`,
    also returns the entropy of each position's next-token distribution, (B, T-1).
    position_ids default to the attention-mask cumsum (left padding); pass them for packing.
    `start` > 0 returns positions start .. T-2 only, (B, T-1-start): the vocabulary projection then skips
    the positions before it (PPO's prompt), which the full result would compute and a caller drop.
    """
    targets = input_ids[:, start + 1:]  # (B, T-1-start)
    head = logit_head(unwrap(model))
    if head.own_forward:
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits[:, start:-1]  # (B, T-1-start, V)
        return _logprobs_from_own_logits(logits, targets, temperature, return_entropy)
    # logits_to_keep=1: the model's own lm_head runs on one position only; we project the rest.
    hidden = _final_hidden(model, input_ids, attention_mask, position_ids, logits_to_keep=1)  # (B, T, D)
    weight = lm_head_weight(model)  # (V, D)
    return logprobs_from_hidden(
        hidden[:, start:-1], weight, targets, temperature=temperature, chunk_size=chunk_size,
        return_entropy=return_entropy, scale=head.scale, softcap=head.softcap,
    )


def _logprobs_from_own_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool):
    """log softmax(logits / T)[targets] (and the entropy) from the model's own logits (..., V), float32."""
    logits = logits / temperature if temperature != 1.0 else logits
    logp = selective_log_softmax(logits, targets).float()
    return (logp, entropy_from_logits(logits).float()) if return_entropy else logp


def takes_custom_mask(model: nn.Module) -> bool:
    """Whether a custom (B, 1, L, L) mask (`data.SharedPromptPairs`) gives each token its own row's context: the
    attention must take a mask (SDPA, eager; flash attention has none, flex wants a BlockMask), and the model must
    have no sliding window, which transformers adds
    to the masks it builds but not to one it is given."""
    config = unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return attention_name(model) in ("sdpa", "eager") and getattr(text, "sliding_window", None) is None


def _custom_mask(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """A custom (B, 1, L, L) bool mask (True = may attend) in the form the attention takes: eager attention adds
    its mask to the scores, so it gets the additive form."""
    if attention_mask.dtype == torch.bool and attention_name(model) != "sdpa":
        dtype = next(unwrap(model).parameters()).dtype
        attention_mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
            ~attention_mask, torch.finfo(dtype).min)
    return attention_mask


def _custom_mask_hidden(model: nn.Module, input_ids, attention_mask, position_ids, **kwargs) -> torch.Tensor:
    """Final hidden states (B, L, D) under a custom (B, 1, L, L) bool mask (True = may attend), e.g.
    `data.SharedPromptPairs`."""
    return _final_hidden(model, input_ids, _custom_mask(model, attention_mask), position_ids, **kwargs)


def token_logprobs_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    source: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(targets[i, j] | the context of flattened position source[i, j]), shape of `targets`, float32.

    For rows whose tokens do not simply predict their right neighbour, e.g. `data.SharedPromptPairs` (prompt,
    chosen, rejected in one row): attention_mask (B, 1, L, L) bool (True = may attend), position_ids (B, L),
    source (N, C) indices into the B * L positions, targets (N, C) token ids.
    """
    head = logit_head(unwrap(model))
    if head.own_forward:
        logits = model(input_ids=input_ids, attention_mask=_custom_mask(model, attention_mask), position_ids=position_ids,
                       use_cache=False).logits  # (B, L, V)
        picked = logits.reshape(-1, logits.shape[-1])[source.reshape(-1)]  # (N * C, V)
        return _logprobs_from_own_logits(picked, targets.reshape(-1), temperature, False).reshape(targets.shape)
    hidden = _custom_mask_hidden(model, input_ids, attention_mask, position_ids, logits_to_keep=1)  # (B, L, D)
    picked = hidden.reshape(-1, hidden.shape[-1])[source.reshape(-1)]  # (N * C, D)
    logp = logprobs_from_hidden(picked, lm_head_weight(model), targets.reshape(-1), temperature=temperature,
                                scale=head.scale, softcap=head.softcap)
    return logp.reshape(targets.shape)  # (N, C)


def _score_head(model: nn.Module) -> nn.Module:
    inner = unwrap(model)
    for name in ("score", "classifier"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(inner).__name__} has no `score` head; load it with load_sequence_classifier")


def token_values(
    critic: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The classifier head applied at every position: (B, T) for one label, (B, T, C) for C labels.

    The PPO critic's V(s_t) for the prefix ending at token t.
    """
    hidden = _final_hidden(critic, input_ids, attention_mask, position_ids)  # (B, T, D)
    values = _score_head(critic)(hidden)  # (B, T, C); a peft ModulesToSaveWrapper routes to the trained copy
    values = values.float()
    return values.squeeze(-1) if values.shape[-1] == 1 else values


def sequence_scores_at(rm: nn.Module, input_ids, attention_mask, position_ids, index) -> torch.Tensor:
    """The score head at flattened positions `index` (N,) of rows with a custom (B, 1, L, L) bool mask: (N,) for one
    label, (N, C) for C. For `data.SharedPromptPairs` with index = `last`: each completion's reward, read where its
    hidden state has seen exactly its own prompt+completion row (the same score as `sequence_scores` there)."""
    hidden = _custom_mask_hidden(rm, input_ids, attention_mask, position_ids)  # (B, L, D)
    picked = hidden.reshape(-1, hidden.shape[-1])[index]  # (N, D)
    scores = _score_head(rm)(picked).float()  # (N, C)
    return scores.squeeze(-1) if scores.shape[-1] == 1 else scores


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)  # (T,)
    return (positions * attention_mask.long()).argmax(-1)  # (B,)


def sequence_scores(rm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Reward-model score read at the last non-pad token: (B,) for one label, (B, C) for C.

    Found from the attention mask, so left and right padding give the same score.
    """
    values = token_values(rm, input_ids, attention_mask)  # (B, T) or (B, T, C)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # (B,)
    return values[rows, last_token_index(attention_mask)]


# --------------------------------------------------------------------------- shared prompts (GRPO groups)


def _cache_kwarg(module: nn.Module) -> str | None:
    """The keyword a forward takes its KV cache under (transformers 5 renamed `past_key_values` to `cache`)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def shared_prompt_unsupported(model: nn.Module) -> str | None:
    """None when `shared_prompt_logprobs` gives `token_logprobs`' numbers on this model, else why it does not (the
    caller then takes the per-row layout): logits that need the model's own forward, an attention other than SDPA /
    eager, sliding-window or chunked layers (a cache that keeps only the window, per-layer masks), gradient
    checkpointing (transformers drops the cache under it), FSDP, or a model with no separate backbone or no cache."""
    inner = unwrap(model)
    config = inner.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if logit_head(inner).own_forward:
        return "the model's logits need its own forward"
    if attention_name(model) not in ("sdpa", "eager"):
        return f"attention {attention_name(model)!r} (shared prompts need sdpa or eager)"
    if (set(getattr(text, "layer_types", None) or ["full_attention"]) != {"full_attention"}
            or getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)):
        return "sliding-window or chunked attention layers"
    if getattr(inner, "is_activation_checkpointing", None) or (
            not hasattr(inner, "is_activation_checkpointing") and getattr(inner, "is_gradient_checkpointing", False)):
        return "gradient checkpointing (no KV cache under it)"
    if any(type(m).__name__.startswith("FSDP") for m in (model, inner)):
        return "FSDP"
    if inner.base_model is inner or _cache_kwarg(inner) is None or _cache_kwarg(inner.base_model) is None:
        return f"{type(inner).__name__} has no separate backbone taking a KV cache"
    return None


def prompt_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """(N,) group index of each row: consecutive rows with the same (left-padded) prompt share one."""
    ids, mask = input_ids[:, :prompt_width], attention_mask[:, :prompt_width]
    same = (ids[1:] == ids[:-1]).all(-1) & (mask[1:] == mask[:-1]).all(-1)  # (N-1,)
    return torch.cat([same.new_ones(1), ~same]).long().cumsum(0) - 1


def shared_prompt_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 1024,
):
    """`token_logprobs(model, input_ids, attention_mask, start=prompt_width - 1)` with each run of rows that share a
    prompt (a GRPO group) running that prompt through the model once: (N, R) log-probs of the response tokens
    input_ids[:, P:] (and entropies), float32. Rows: a left-padded prompt of width P, then the response.

    The distinct prompts (k, P') (leading columns that are padding in all of them dropped) run through the backbone
    with a KV cache; the cache is expanded to the N rows by repeated indices (`DynamicCache.batch_select_indices`,
    a differentiable gather: the gradient of every row flows back into its group's prompt forward); the responses'
    first R - 1 tokens then run on top of it through the model's top-level forward (wrappers and LoRA see the call),
    with the prompt-and-response padding mask and positions continuing each prompt's. Response token 0 is predicted
    from the prompt's last hidden state. The same numbers as the per-row layout up to float rounding; the caller
    checks `shared_prompt_unsupported` first. Tokens through the model: k P' + N (R - 1) instead of N (P + R).
    """
    from transformers import DynamicCache

    p = prompt_width
    inner = unwrap(model)
    group = prompt_groups(input_ids, attention_mask, p)  # (N,)
    first = torch.cat([group.new_zeros(1), (group[1:] != group[:-1]).nonzero().squeeze(-1) + 1])  # (k,) first rows
    positions = positions_from_mask(attention_mask)  # (N, P+R)
    prompt_mask = attention_mask[first, :p]  # (k, P)
    lead = int((prompt_mask.sum(0) == 0).long().cumprod(0).sum())  # columns of padding in every prompt
    cache = DynamicCache(config=inner.config)
    out = inner.base_model(input_ids=input_ids[first, lead:p], attention_mask=prompt_mask[:, lead:],
                           position_ids=positions[first, lead:p], use_cache=True,
                           **{_cache_kwarg(inner.base_model): cache})
    last = out.last_hidden_state[:, -1]  # (k, D): left padding, so the last column is each prompt's last token
    cache.batch_select_indices(group)  # (N, ...): repeated indices, autograd flows through the gather
    hidden = last[group][:, None]  # (N, 1, D)
    if input_ids.shape[1] - p > 1:
        caught = []
        hook = inner.base_model.register_forward_hook(lambda _m, _args, o: caught.append(o[0]))
        try:
            model(input_ids=input_ids[:, p:-1], attention_mask=attention_mask[:, lead:-1],
                  position_ids=positions[:, p:-1], use_cache=True, logits_to_keep=1, **{_cache_kwarg(inner): cache})
        finally:
            hook.remove()
        hidden = torch.cat([hidden, caught[-1]], dim=1)  # (N, R, D)
    head = logit_head(inner)
    return logprobs_from_hidden(hidden, lm_head_weight(model), input_ids[:, p:], temperature=temperature,
                                chunk_size=chunk_size, return_entropy=return_entropy, scale=head.scale,
                                softcap=head.softcap)
