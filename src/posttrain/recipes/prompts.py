"""What the online recipes (ppo, grpo, online-dpo) share: their prompts, the held-out prompts, and the held-out
gold evaluation of a built-in task."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import ConfigError
from posttrain.data import load_examples, tokenize_prompt
from posttrain.engine.dist import DistInfo, RolloutShare
from posttrain.rewards import prompt_text, row_columns


@dataclass
class Prompts:
    """Prompt rows: the messages (for the reward and the verifier), their token ids with the generation prompt, and
    each row's other columns (`answer`, ...: what a reward function or a task's verifier may read)."""

    messages: list[list[dict]]
    ids: list[list[int]]
    columns: list[dict[str, Any]] | None = None  # one dict per row; None: no row has other columns

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, indices: list[int]) -> Prompts:
        columns = [self.columns[i] for i in indices] if self.columns is not None else None
        return Prompts([self.messages[i] for i in indices], [self.ids[i] for i in indices], columns)

    def row_columns(self, prompt_index: list[int]) -> dict[str, list[Any]]:
        """{column: one value per completion} for completions answering rows `prompt_index` (the reward's
        `columns`)."""
        return row_columns([self.columns[i] for i in prompt_index]) if self.columns is not None else {}


def reward_context(prompts: Prompts, rollout, step: int) -> dict[str, Any]:
    """The reward call's keyword arguments for a rollout of `prompts` (rewards.RewardSource): each completion's
    prompt row columns, its sampled token ids through EOS, and the training step."""
    lengths = rollout.response_lengths().tolist()
    ids = [row[:n] for row, n in zip(rollout.response_ids.tolist(), lengths)]
    return {"columns": prompts.row_columns(rollout.prompt_index.tolist()), "completion_ids": ids, "step": step}


def reward_part_stats(parts: dict[str, torch.Tensor], names: list[str], share: RolloutShare) -> dict[str, float]:
    """`rewards/NAME/mean` and `rewards/NAME/std` (TRL's names; std: the sample std) of each reward's own scores
    (`rewards.score_parts`) over all ranks' completions. `names`: `rewards.reward_names(source)`, the same on every
    rank (a rank with no rows passes no parts)."""
    totals = []
    for name in names:
        scores = parts[name].double() if name in parts else torch.zeros(0, dtype=torch.float64)
        totals += [float(scores.sum()), float(scores.pow(2).sum()), float(scores.numel())]
    totals = share.sum(totals)
    out = {}
    for i, name in enumerate(names):
        s, sq, n = totals[3 * i: 3 * i + 3]
        mean = s / n if n else 0.0
        out[f"rewards/{name}/mean"] = mean
        out[f"rewards/{name}/std"] = math.sqrt(max(sq - n * mean * mean, 0.0) / (n - 1)) if n > 1 else 0.0
    return out


def check_missing_eos_penalty(value: float) -> None:
    """A positive `missing_eos_penalty` is refused: the value is added to a truncated response's score, so a positive
    one (TRL's convention: positive, subtracted) would pay for truncation."""
    if value > 0:
        raise ConfigError(f"`missing_eos_penalty: {value:g}` would REWARD a response with no EOS: here the value is added "
                          f"to its score (TRL's key of the same name is positive and subtracted); write "
                          f"missing_eos_penalty={-value:g} to penalise truncation, or 0 for no penalty")


def apply_missing_eos_penalty(scores: torch.Tensor, ended_with_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores (N,) + penalty on each response without EOS (Huang et al. 2024: the model learns to stop)."""
    return scores + penalty * (~ended_with_eos.bool()).to(scores.dtype)


def load_prompts(sources: list[str], cfg: Any, tok, limit: int = 0) -> Prompts:
    """Prompt rows (kind `prompt`) of `sources`, the first `limit` when > 0, tokenised with the generation prompt.
    A prompt longer than max_length - rollout.max_new_tokens (there must be room to answer) is dropped and counted."""
    examples, _ = load_examples(sources, "prompt", fmt=cfg.data.format, skip_invalid=cfg.data.skip_invalid)
    if limit > 0:
        examples = examples[:limit]
    budget = cfg.max_length - cfg.rollout.max_new_tokens
    kept = [(ex, ids) for ex in examples if 0 < len(ids := tokenize_prompt(tok, ex.prompt)) <= budget]
    if not kept:
        raise ConfigError(f"{', '.join(sources)}: no usable prompt; every prompt is longer than max_length - "
                          f"rollout.max_new_tokens = {budget} tokens")
    if len(kept) < len(examples):
        print(f"prompts: dropped {len(examples) - len(kept)} of {len(examples)} longer than {budget} tokens", flush=True)
    columns = [dict(ex.meta) for ex, _ in kept]
    return Prompts([ex.prompt for ex, _ in kept], [i for _, i in kept], columns if any(columns) else None)


def prompt_sources(cfg: Any) -> list[str]:
    """`prompts`, else `data.train`."""
    sources = list(cfg.prompts or cfg.data.train)
    if not sources:
        raise ConfigError("no prompts: set `prompts` (or data.train) to a prompt file, e.g. a task's prompts.jsonl")
    return sources


def held_out_sources(cfg: Any, sources: list[str]) -> list[str]:
    """The held-out prompts: `data.eval`, else `eval.jsonl` beside the first prompt file (or `task:NAME/eval.jsonl`)."""
    if cfg.data.eval:
        return list(cfg.data.eval)
    if sources[0].startswith("task:"):  # a built-in task's file: its eval.jsonl sits beside it
        return [sources[0].rsplit("/", 1)[0] + "/eval.jsonl"]
    beside = Path(sources[0]).parent / "eval.jsonl"
    if not beside.is_file():
        raise ConfigError(f"`eval_task` is set but there is no held-out prompt file: set data.eval, or put eval.jsonl "
                          f"beside {sources[0]} (`posttrain task {cfg.eval_task} DIR` writes one)")
    return [str(beside)]


def load_gold_task(cfg: Any, tok, sources: list[str]):
    """(the `eval_task`, its first `eval_prompts` held-out prompts), or (None, None) without `eval_task`."""
    if not cfg.eval_task:
        return None, None
    from posttrain.tasks import get_task

    return get_task(cfg.eval_task), load_prompts(held_out_sources(cfg, sources), cfg, tok, cfg.eval_prompts)


def load_inputs(cfg: Any, tok) -> tuple[Prompts, Any, Prompts | None]:
    """An online recipe's inputs: (the training prompts of `prompts` / `data.train`, the first `data.max_rows`;
    the `eval_task` or None; its held-out prompts or None)."""
    sources = prompt_sources(cfg)
    return (load_prompts(sources, cfg, tok, cfg.data.max_rows), *load_gold_task(cfg, tok, sources))


@torch.no_grad()
def gold_accuracy(sampler, tok, task, prompts: Prompts, dist: DistInfo | None,
                  generator: torch.Generator | None = None) -> tuple[float, float | None]:
    """Mean verifier score of GREEDY completions of the held-out prompts and, with `generator`, of completions sampled
    at the training temperature (None without). Each rank answers its share of the prompts, sampled as one process
    would sample those rows."""
    share = RolloutShare(len(prompts), 1, dist)
    mine = prompts.select(share.take(list(range(len(prompts)))))
    ids, questions = mine.ids, [prompt_text(m) for m in mine.messages]
    columns = mine.row_columns(list(range(len(mine))))  # one sample per prompt: rows in prompt order
    greedy = sampled = 0.0
    if ids:
        greedy = float(sum(task.verify_batch(questions, sampler.generate(ids, greedy=True).texts(tok), columns)))
        if generator is not None:
            rollout = sampler.generate(ids, generator=generator, row_offset=share.row_offset, total_rows=share.total_rows)
            sampled = float(sum(task.verify_batch(questions, rollout.texts(tok), columns)))
    greedy, sampled = share.sum([greedy, sampled])
    n = max(len(prompts), 1)
    return greedy / n, (sampled / n if generator is not None else None)


def gold_metrics(cfg: Any, sampler, tok, task, held_out: Prompts, step: int, dist: DistInfo | None) -> dict:
    """`eval/gold_accuracy` (greedy decoding) and `eval/sampled_accuracy` (sampling at the training temperature, with
    draws seeded by `seed` and `step`) on the held-out prompts: ppo's and grpo's evaluation."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * step + 1)
    greedy, sampled = gold_accuracy(sampler, tok, task, held_out, dist, generator)
    return {"eval/gold_accuracy": greedy, "eval/sampled_accuracy": sampled}
