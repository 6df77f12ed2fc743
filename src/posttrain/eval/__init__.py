"""posttrain.eval: the metrics a user compares runs by (`metrics`, pure) and `posttrain eval` (`run`)."""

from posttrain.eval.metrics import (
    accuracy,
    macro_f1,
    mean_and_stderr,
    mean_pass_at_k,
    pass_at_k,
    perplexity,
    sequence_kl,
)
from posttrain.eval.run import evaluate, main

__all__ = [
    "accuracy",
    "evaluate",
    "macro_f1",
    "main",
    "mean_and_stderr",
    "mean_pass_at_k",
    "pass_at_k",
    "perplexity",
    "sequence_kl",
]
