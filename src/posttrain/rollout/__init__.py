"""posttrain.rollout: batched KV-cached sampling for PPO, online DPO and evaluation (optional vLLM backend)."""

from posttrain.rollout.backends import GenerationBackend, VLLMBackend, build_backend
from posttrain.rollout.sampler import RolloutBatch, Sampler, assemble_batch, filter_logits, sample_from_probs

__all__ = [
    "GenerationBackend",
    "RolloutBatch",
    "Sampler",
    "VLLMBackend",
    "assemble_batch",
    "build_backend",
    "filter_logits",
    "sample_from_probs",
]
