"""Batched sampling with a KV cache: the rollout engine of PPO, online DPO and eval.

The loop is the textbook one (prefill the left-padded prompts once, then one token per
step from the cache), with three details that matter for RL on language models
(Huang et al. 2024, "The N+ implementation details of RLHF with PPO", arXiv 2403.17031):

- Left padding with position ids from the attention mask (``cumsum - 1``), so a padded
  prompt is decoded exactly as the same prompt alone.
- The returned log-probs are ``log_softmax(logits / T)`` of the *unfiltered* distribution at
  the sampling temperature T: the same quantity the PPO loss recomputes, so the first
  ratio pi/pi_old is 1 up to float error. top-k / top-p only change which token is drawn.
- Each row stops at its first EOS (the chat end-of-turn token). Finished rows are removed
  from the batch and from the KV cache (``DynamicCache.batch_select_indices``), so they stop
  costing compute; the removal waits until a quarter of the batch is done, because the
  cache copy costs about one decoding step.
- A group of samples of one prompt (``num_samples`` > 1: GRPO / RLOO groups, online DPO's samples per prompt)
  shares one prefill: each distinct prompt runs through the model once and its KV cache and last logits are
  copied to the group's rows (``batch_select_indices`` with repeated indices), so the prefill costs 1/num_samples
  of the unshared one. The copies are the very tensors a row's own prefill computes, so the samples and log-probs
  are those of the unshared path (tests/rollout/test_sampler_families.py).

Randomness: each step draws one uniform per row of the *full* chunk (finished rows included)
and samples by inverting the row's CDF. A row's tokens therefore depend only on the
generator's state and on that row, never on which other rows are still running, which is
what makes dropping finished rows give exactly the samples of keeping them. Under several processes,
every rank draws the uniforms of the whole batch from the same generator and reads its own rows' slice
(``row_offset``, ``total_rows``): a rank's rows get the very numbers one process sampling the whole
batch would give them, so a rollout split over ranks is the one-process rollout (one generation chunk).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from posttrain.config import RolloutConfig
from posttrain.models.forward import attention_name


@dataclass
class RolloutBatch:
    """N sampled responses (N = prompts x num_samples), prompts left-padded to width P.

    sequences:      (N, P+R) long  left-padded prompt tokens, then the response tokens
    attention_mask: (N, P+R) long  1 on prompt tokens and on response tokens through the first EOS
    prompt_width:   P
    response_ids:   (N, R) long    sampled tokens, pad after the first EOS
    response_mask:  (N, R) float   1 through the first EOS (inclusive), 0 after
    logprobs:       (N, R) float   log_softmax(logits / T) at the sampled token, 0 on padding
    ended_with_eos: (N,) bool      the response contains EOS (else it hit max_new_tokens)
    prompt_index:   (N,) long      which input prompt each row answers
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ended_with_eos: torch.Tensor
    prompt_index: torch.Tensor

    def position_ids(self) -> torch.Tensor:
        """(N, P+R) positions counted over real tokens only, as the sampler used them."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def response_lengths(self) -> torch.Tensor:
        """(N,) response tokens through the first EOS."""
        return self.response_mask.sum(-1).long()

    def texts(self, tokenizer) -> list[str]:
        """Decoded responses, special tokens (EOS, pad) left out."""
        out = []
        for ids, n in zip(self.response_ids.tolist(), self.response_lengths().tolist()):
            out.append(tokenizer.decode(ids[:n], skip_special_tokens=True))
        return out

    def to(self, device) -> RolloutBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return RolloutBatch(**moved)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (Holtzman et al. 2020) to -inf. logits: (B, V).

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p; the
    most likely token is always kept, so a tiny top_p is greedy decoding.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: the token i with cdf[i-1] <= u * total < cdf[i]. probs (B, V), u (B,) in [0, 1)."""
    cdf = probs.cumsum(-1)  # (B, V)
    x = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # (B, 1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)  # (B,)
    # u * total can round up to total in floating point; never return a zero-probability tail token
    last_positive = probs.shape[-1] - 1 - (probs.flip(-1) > 0).long().argmax(-1)
    return torch.minimum(idx, last_positive)


def assemble_batch(
    prompts: list[list[int]],
    responses: list[list[int]],
    logprobs: list[list[float]] | torch.Tensor,
    prompt_index: list[int],
    *,
    eos_id: int,
    pad_id: int,
) -> RolloutBatch:
    """Build a RolloutBatch from per-row prompt / response token lists (each response cut after its first EOS).

    ``logprobs`` is a list of per-token lists, or an (N, >=R) tensor whose row i is read up to len(responses[i]).
    """
    n = len(responses)
    p = max(len(x) for x in prompts)
    r = max(1, max(len(x) for x in responses))
    prompt_ids = torch.full((n, p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, p), dtype=torch.long)
    response_ids = torch.full((n, r), pad_id, dtype=torch.long)
    response_mask = torch.zeros((n, r))
    lp = torch.zeros((n, r), dtype=torch.float32)
    for i, (pi, resp) in enumerate(zip(prompt_index, responses)):
        prompt = prompts[pi]
        prompt_ids[i, p - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[i, p - len(prompt):] = 1
        if resp:
            response_ids[i, : len(resp)] = torch.tensor(resp, dtype=torch.long)
            response_mask[i, : len(resp)] = 1.0
            row = logprobs[i][: len(resp)]
            lp[i, : len(resp)] = row.float() if isinstance(row, torch.Tensor) else torch.tensor(row, dtype=torch.float32)
    ended = torch.tensor([len(x) > 0 and x[-1] == eos_id for x in responses], dtype=torch.bool)
    return RolloutBatch(
        sequences=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        prompt_width=p,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=lp,
        ended_with_eos=ended,
        prompt_index=torch.tensor(prompt_index, dtype=torch.long),
    )


def _forward_params(model) -> set[str]:
    """Keyword names the model's forward accepts, looking through a PEFT wrapper to the base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def _attends_to_full_past(config) -> bool:
    """Every layer attends to the whole cache: no sliding-window or chunked layers (Mistral, Qwen2 with
    use_sliding_window, Gemma 2 / 3 have them). Their caches keep only the window's keys, and their masks
    differ per layer type, so only transformers can build them (a padding mask over the full length fails
    there); a config that merely might have one is treated as having one, which is only slower."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    return (layer_types == {"full_attention"} and not getattr(text, "sliding_window", None)
            and not getattr(text, "attention_chunk_size", None))


class Sampler:
    """KV-cached batched sampler for any HF causal LM; the default generation backend.

    ``generate`` puts the model in eval mode under inference_mode and restores its previous mode.
    ``rollout_cfg.temperature <= 0`` means greedy decoding. Log-probs are always taken at
    ``rollout_cfg.temperature`` (at 1 when it is <= 0), greedy or not. ``drop_finished=False`` keeps
    finished rows in the batch (same samples, more compute; kept for the tests that prove it), and
    ``share_prefill=False`` prefills every row of a group on its own (same samples, more compute; module doc).
    ``amp``: the autocast dtype the forwards run under (a training run's `engine.autocast_dtype`; its weights are
    float32).
    """

    def __init__(self, model, tokenizer, rollout_cfg: RolloutConfig | None = None, *, drop_finished: bool = True,
                 amp: torch.dtype | None = None, share_prefill: bool = True):
        self.model = model
        self.amp = amp
        self.cfg = rollout_cfg or RolloutConfig()
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if self.eos_id is None or self.pad_id is None or self.eos_id == self.pad_id:
            raise ValueError(f"the tokenizer needs an EOS and a different pad token (eos={self.eos_id}, pad={self.pad_id})")
        self.drop_finished = drop_finished
        self.share_prefill = share_prefill

    def sync_weights(self, model) -> None:
        """The HF sampler samples from the live model object, so syncing is just pointing at it."""
        self.model = model

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self,
        prompts: list[list[int]],
        *,
        num_samples: int = 1,
        greedy: bool = False,
        generator: torch.Generator | None = None,
        row_offset: int = 0,
        total_rows: int | None = None,
    ) -> RolloutBatch:
        """Sample ``num_samples`` responses per prompt; rows are prompt-major (row i answers prompt i // num_samples).

        ``row_offset`` / ``total_rows``: these rows are rows row_offset.. of a batch of ``total_rows`` that other
        processes sample the rest of; each step draws ``total_rows`` uniforms and uses this slice (module doc)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        greedy = greedy or self.cfg.temperature <= 0
        prompt_index = [i for i in range(len(prompts)) for _ in range(num_samples)]
        total_rows = len(prompt_index) if total_rows is None else total_rows
        if row_offset < 0 or row_offset + len(prompt_index) > total_rows:
            raise ValueError(f"rows {row_offset}..{row_offset + len(prompt_index)} do not fit in total_rows={total_rows}")
        chunk = self.cfg.generation_batch_size if self.cfg.generation_batch_size > 0 else len(prompt_index)
        responses: list[list[int]] = []
        logprobs: list[torch.Tensor] = []
        was_training = self.model.training
        self.model.eval()
        try:
            # inference_mode, not no_grad: no version counters or view tracking, ~10% less per-token overhead on
            # a small model; the tensors it makes are only read after (assemble_batch copies them into new ones)
            cast = torch.autocast(self._device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
            with torch.inference_mode(), cast:
                for start in range(0, len(prompt_index), chunk):
                    rows = [prompts[i] for i in prompt_index[start:start + chunk]]
                    draw = (row_offset + start, total_rows) if total_rows > len(prompt_index) else None
                    r, lp = self._generate_chunk(rows, greedy=greedy, generator=generator, draw=draw)
                    responses += r
                    logprobs += list(lp)
        finally:
            self.model.train(was_training)
        return assemble_batch(prompts, responses, logprobs, prompt_index, eos_id=self.eos_id, pad_id=self.pad_id)

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Logits of the last position, (A, V) float32."""
        if getattr(self, "_params_of", (None,))[0] is not self.model:  # inspect once per model, not per token
            self._params_of = (self.model, _forward_params(self.model))
        params = self._params_of[1]
        # transformers 5 renamed `past_key_values` to `cache`; older versions only know the first
        kwargs = {"cache" if "cache" in params else "past_key_values": cache}
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1  # the prefill needs only the last position's logits
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()

    def _mask_kind(self, padded: bool):
        """attn (A, L) -> what a decoding step passes as its attention mask (see `_generate_chunk`)."""
        if padded and attention_name(self.model) == "sdpa" and _attends_to_full_past(self.model.config):
            return lambda attn: attn.bool()[:, None, None, :]  # (A, 1, 1, L)
        return lambda attn: attn

    def _generate_chunk(self, rows: list[list[int]], *, greedy: bool, generator,
                        draw: tuple[int, int] | None = None) -> tuple[list[list[int]], torch.Tensor]:
        """One chunk's responses and log-probs. `draw` = (offset, total): take uniforms offset.. of `total` a step."""
        cfg, device = self.cfg, self._device
        b, p = len(rows), max(len(x) for x in rows)
        # rows are prompt-major: a run of equal rows is one prompt's group, prefilled once (module doc)
        group = [0] * b  # group[i]: the distinct prompt row i answers
        distinct = [rows[0]]
        for i in range(1, b):
            if not (self.share_prefill and rows[i] == rows[i - 1]):
                distinct.append(rows[i])
            group[i] = len(distinct) - 1
        input_ids = torch.full((len(distinct), p), self.pad_id, dtype=torch.long, device=device)
        attn = torch.zeros((len(distinct), p), dtype=torch.long, device=device)
        for i, x in enumerate(distinct):
            input_ids[i, p - len(x):] = torch.tensor(x, dtype=torch.long, device=device)
            attn[i, p - len(x):] = 1
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)  # (G, P) positions over real tokens only
        temp = cfg.temperature if cfg.temperature > 0 else 1.0

        tokens = torch.full((b, cfg.max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros((b, cfg.max_new_tokens), dtype=torch.float32, device=device)
        lengths = torch.zeros(b, dtype=torch.long, device=device)
        active = torch.arange(b, device=device)  # (A,) chunk rows still in the batch
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, attn, position_ids, cache)  # (G, V), one row per distinct prompt
        if len(distinct) < b:
            expand = torch.tensor(group, dtype=torch.long, device=device)  # (B,)
            cache.batch_select_indices(expand)
            logits, attn = logits[expand], attn[expand]  # (B, V), (B, P)
        next_pos = attn.sum(-1)  # (B,) position of the next token
        # A decoding step's query sees every cached position, so its SDPA mask is the padding mask alone: built here
        # as (A, 1, 1, L) bool, it spares transformers' mask construction on every step (the same boolean mask it
        # would build; without left padding it builds none, and neither does this). Sliding-window models get the
        # 2D mask, from which transformers builds each layer type's mask over what that layer's cache holds.
        step_mask = self._mask_kind(bool((attn == 0).any()))
        for t in range(cfg.max_new_tokens):
            scaled = logits / temp
            if greedy:
                nxt = scaled.argmax(-1)  # (A,)
            else:
                # one uniform per row of the whole chunk: a row's draw never depends on the others
                u = torch.rand(b if draw is None else draw[1], generator=generator,
                               device=generator.device if generator is not None else device)
                if draw is not None:
                    u = u[draw[0]: draw[0] + b]  # (B,) this process's rows of the whole batch
                probs = filter_logits(scaled, cfg.top_k, cfg.top_p).softmax(-1)
                nxt = sample_from_probs(probs, u.to(device)[active])
            step_lp = torch.log_softmax(scaled, -1).gather(-1, nxt[:, None]).squeeze(-1)  # (A,)
            live = ~finished[active]  # rows kept after finishing (drop_finished=False) write nothing
            rows_live = active[live]
            tokens[rows_live, t] = nxt[live]
            logprobs[rows_live, t] = step_lp[live]
            lengths[rows_live] += 1
            finished[rows_live] |= nxt[live] == self.eos_id
            if bool(finished.all()) or t == cfg.max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((attn.shape[0], 1), dtype=torch.long, device=device)], dim=1)
            step_input, step_pos = nxt[:, None], next_pos[:, None]
            next_pos = next_pos + 1
            if self.drop_finished:
                keep = (~finished[active]).nonzero().squeeze(-1)  # (A',) positions within the active batch
                # copying the cache costs about one decoding step, so compact once a quarter of the batch is done
                if 4 * (active.numel() - keep.numel()) >= active.numel():
                    cache.batch_select_indices(keep)
                    active, attn, next_pos = active[keep], attn[keep], next_pos[keep]
                    step_input, step_pos = step_input[keep], step_pos[keep]
            logits = self._forward(step_input, step_mask(attn), step_pos, cache)
        tokens, lengths = tokens.cpu(), lengths.tolist()
        return [tokens[i, : lengths[i]].tolist() for i in range(b)], logprobs.cpu()
