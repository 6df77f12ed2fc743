"""Generation backends: the HF KV-cached sampler (default) or vLLM (optional extra).

A backend turns token-id prompts into a :class:`RolloutBatch` and can be told that the
policy's weights changed (``sync_weights``). Recipes only see this interface, so moving
generation to vLLM (or, later, to Ray actors running vLLM) changes no recipe code.
"""

from __future__ import annotations

from typing import Protocol

import torch

from posttrain.config import ConfigError, EvalSamplingConfig, GenerateSamplingConfig, SamplingConfig
from posttrain.rollout.sampler import RolloutBatch, Sampler, assemble_batch


class GenerationBackend(Protocol):
    def generate(self, prompts: list[list[int]], *, num_samples: int = 1, greedy: bool = False,
                 generator: torch.Generator | None = None, row_offset: int = 0,
                 total_rows: int | None = None) -> RolloutBatch: ...

    def sync_weights(self, model) -> None: ...


class VLLMBackend:
    """vLLM in the same process as the trainer (one GPU, colocated). Untested in this repo's CI.

    What it does: maps the sampling keys to ``vllm.SamplingParams`` (``logprobs=1`` so the sampled
    token's log-prob comes back), samples from token-id prompts, and packs the result into
    the same RolloutBatch as the HF sampler. ``sync_weights`` copies the policy's state dict
    into vLLM's model with ``LLM.apply_model`` (vLLM >= 0.8) after each optimizer step.

    What differs from the HF sampler: vLLM reports log-probs of its own kernels (and, unless
    the engine is built with ``logprobs_mode="processed_logprobs"``, of the raw logits before
    temperature), so recipes must recompute old log-probs with the training model before the
    PPO ratio; that is what the PPO recipe does anyway. Seeds come from ``generator`` but
    vLLM's sampling is not bit-reproducible across batch shapes.
    """

    def __init__(self, model_path: str, tokenizer, rollout_cfg: SamplingConfig, *, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.3):
        try:
            import vllm
        except ImportError:
            raise ConfigError("rollout.backend=vllm needs vLLM: pip install 'posttrain[vllm]'") from None
        self._vllm = vllm
        self.cfg = rollout_cfg
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.llm = vllm.LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            enable_prefix_caching=True)

    def sampling_params(self, *, num_samples: int, greedy: bool, seed: int | None):
        cfg = self.cfg
        greedy = greedy or cfg.temperature <= 0
        return self._vllm.SamplingParams(
            n=num_samples,
            temperature=0.0 if greedy else cfg.temperature,
            top_k=cfg.top_k if cfg.top_k > 0 else -1,  # -1 = off in every vLLM version
            top_p=cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            stop_token_ids=[self.eos_id],
            logprobs=1,
            seed=seed,
        )

    def generate(self, prompts: list[list[int]], *, num_samples: int = 1, greedy: bool = False,
                 generator: torch.Generator | None = None, row_offset: int = 0,
                 total_rows: int | None = None) -> RolloutBatch:
        """As `Sampler.generate`; `row_offset` only varies the seed (vLLM draws are not reproducible per row)."""
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator)) + row_offset if generator is not None else None
        params = self.sampling_params(num_samples=num_samples, greedy=greedy, seed=seed)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        responses, logprobs, index = [], [], []
        for i, out in enumerate(outputs):
            for sample in out.outputs:
                ids = list(sample.token_ids)
                responses.append(ids)
                logprobs.append([step[t].logprob for t, step in zip(ids, sample.logprobs)])
                index.append(i)
        return assemble_batch(prompts, responses, logprobs, index, eos_id=self.eos_id, pad_id=self.pad_id)

    def sync_weights(self, model) -> None:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        self.llm.apply_model(lambda m: m.load_weights(state.items()))


def build_backend(model, tokenizer, rollout_cfg: EvalSamplingConfig | GenerateSamplingConfig, *,
                  model_path: str = "") -> GenerationBackend:
    """``rollout.backend``: ``hf`` -> :class:`Sampler` over ``model``; ``vllm`` -> :class:`VLLMBackend` loading ``model_path``."""
    if rollout_cfg.backend == "hf":
        return Sampler(model, tokenizer, rollout_cfg)
    if rollout_cfg.backend == "vllm":
        if not model_path:
            raise ConfigError("rollout.backend=vllm needs the model folder to load into vLLM")
        backend = VLLMBackend(model_path, tokenizer, rollout_cfg)
        backend.sync_weights(model)
        return backend
    raise ConfigError(f"config key `rollout.backend` must be hf or vllm, got {rollout_cfg.backend!r}")
