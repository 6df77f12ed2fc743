"""``posttrain eval MODEL [task=NAME] [prompts=FILE] [data=FILE] [ref_model=DIR] [reward.*=...]``.

What it measures, for a causal LM:

- Gold accuracy on held-out prompts (the task's ``eval.jsonl``, or ``prompts``): a response is correct
  when the task's verifier gives it >= 1. ``gold_accuracy`` is greedy pass@1 (``greedy: true``), else
  sampled pass@1; ``gold_score`` is the mean verifier score on the same responses.
- ``pass@k`` for k = 1..num_samples from ``num_samples`` samples per prompt at ``rollout.temperature``
  (the unbiased estimator of Chen et al. 2021, averaged over prompts), ``sampled_gold_score`` and its
  standard error over prompts ``sampled_gold_score_se``. A task with a graded score (``Task.graded``, e.g.
  sentiment's share of positive words) has no right / wrong answer: no ``gold_accuracy`` and no pass@k, its
  measure is the mean score over samples. ``measure`` names the headline: ``pass@1`` or ``sampled_gold_score``.
- ``warnings``: degenerate evidence by name (``posttrain.eval.health``): one greedy outcome for every prompt,
  no score spread within any prompt's samples, an EOS-rate collapse, a model that barely moved from
  ``ref_model`` (KL under 0.01 nats); printed after the table too.
- ``reward``: the mean score of the samples under ``reward.*`` (a reward model, function or verifier).
- ``kl``: mean over samples of the sequence KL to ``ref_model``, sum over response tokens (EOS included)
  of log pi(y_t) - log pi_ref(y_t) — the k1 Monte-Carlo estimate of KL(pi || pi_ref) on the model's own
  samples. Both log-probs are taken at the sampling temperature (the distributions the samples come
  from) by full forwards with identical batching, so a model's KL to itself is exactly 0.
- ``length`` (response tokens through the first EOS) and ``eos_rate`` (fraction of samples that stop
  with EOS before ``rollout.max_new_tokens``), both on the samples.
- ``perplexity`` on ``data`` files: exp of the token-mean NLL of the assistant tokens (EOS included).

For a sequence classifier (the folder's architecture ends in ``ForSequenceClassification``):
``accuracy`` and ``macro_f1`` on the labelled ``data`` files.

``eval.json`` (to ``output``, default ``MODEL/eval.json``, written atomically) holds these numbers at the
top level and, under ``samples``, every prompt with its responses and verdicts. Every generation goes
through ``rollout.backend`` (``hf``: ``rollout.Sampler``; ``vllm``: ``rollout.VLLMBackend``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import ConfigError, EvalConfig
from posttrain.data import (IGNORE, collate_classification, collate_sft, load_examples, tokenize_examples,
                            tokenize_prompt)
from posttrain.data.io import task_file
from posttrain.errors import DataError
from posttrain.eval.health import eval_warnings, paired_warnings
from posttrain.eval.metrics import accuracy, macro_f1, mean_and_stderr, mean_pass_at_k, perplexity, sequence_kl
from posttrain.models import default_device, load_causal_lm, load_sequence_classifier, load_tokenizer, token_logprobs
from posttrain.models.load import load_model_config
from posttrain.rewards import build_reward, prompt_text, row_columns
from posttrain.rollout import RolloutBatch, build_backend


def is_classifier(model_dir: str, trust_remote_code: bool = False) -> bool:
    """Whether a model folder was saved as a sequence classifier (a trained head of its own)."""
    architectures = getattr(load_model_config(model_dir, trust_remote_code=trust_remote_code), "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


# --------------------------------------------------------------------------- generation metrics


@dataclass
class Generations:
    """The held-out prompts and what the model answered."""

    conversations: list[list[dict]]  # one message list per prompt
    prompt_ids: list[list[int]]
    greedy: RolloutBatch | None  # (P rows)
    sampled: RolloutBatch  # (P * num_samples rows), prompt-major
    columns: list[dict] | None = None  # each prompt row's other columns (`answer`, ...), for the task's verifier


def held_out_rows(cfg: EvalConfig) -> tuple[list[list[dict]], list[dict]]:
    """The first ``num_prompts`` prompts of ``prompts`` (or the task's eval.jsonl), as message lists, and each row's
    other columns."""
    sources = list(cfg.prompts) or [str(task_file(f"task:{cfg.task}/eval.jsonl"))]
    examples, _ = load_examples(sources, "prompt")
    if cfg.num_prompts > 0:
        examples = examples[: cfg.num_prompts]
    return [ex.prompt for ex in examples], [dict(ex.meta) for ex in examples]


def held_out_prompts(cfg: EvalConfig) -> list[list[dict]]:
    """The message lists of ``held_out_rows``."""
    return held_out_rows(cfg)[0]


def generate(cfg: EvalConfig, model, tok, conversations: list[list[dict]],
             columns: list[dict] | None = None) -> Generations:
    rollout = copy.deepcopy(cfg.rollout)
    if rollout.generation_batch_size <= 0:
        rollout.generation_batch_size = cfg.batch_size
    sampler = build_backend(model, tok, rollout, model_path=cfg.model)
    ids = [tokenize_prompt(tok, conv) for conv in conversations]
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    greedy = sampler.generate(ids, greedy=True) if cfg.greedy else None
    sampled = sampler.generate(ids, num_samples=cfg.num_samples, generator=generator)
    return Generations(conversations, ids, greedy, sampled, columns)


def response_logprobs(model, batch: RolloutBatch, *, temperature: float, batch_size: int) -> torch.Tensor:
    """(N, R) log p(response token) under ``model`` at ``temperature``, from full forwards (0 past the first EOS)."""
    out = []
    p = batch.prompt_width
    for i in range(0, batch.sequences.shape[0], batch_size):
        seq = batch.sequences[i: i + batch_size]  # (b, P+R)
        attn = batch.attention_mask[i: i + batch_size]
        with torch.no_grad():
            logp = token_logprobs(model, seq, attn, temperature=temperature)  # (b, P+R-1)
        resp = logp[:, p - 1:]  # (b, R): position t predicts token t+1, so the response starts at P-1
        out.append(resp * batch.response_mask[i: i + batch_size])
    return torch.cat(out)


def generation_metrics(cfg: EvalConfig, model, tok, gens: Generations, device) -> tuple[dict, list[dict]]:
    """The numbers of the module docstring, and one record per prompt with its responses."""
    k = cfg.num_samples
    sampled_texts = gens.sampled.texts(tok)
    convs_per_sample = [gens.conversations[i] for i in gens.sampled.prompt_index.tolist()]
    rows = gens.columns or [{} for _ in gens.conversations]
    columns_per_sample = row_columns([rows[i] for i in gens.sampled.prompt_index.tolist()])
    lengths = gens.sampled.response_lengths().float()
    metrics: dict = {}
    records = [{"prompt": prompt_text(c), "samples": sampled_texts[i * k:(i + 1) * k]}
               for i, c in enumerate(gens.conversations)]

    if cfg.task:
        from posttrain.tasks import get_task

        task = get_task(cfg.task)
        questions = [prompt_text(c) for c in convs_per_sample]
        scores = task.verify_batch(questions, sampled_texts, columns_per_sample)
        groups = [scores[i * k:(i + 1) * k] for i in range(len(gens.conversations))]
        correct = [[s >= 1.0 for s in group] for group in groups]
        pass_at = {} if task.graded else {f"pass@{j}": mean_pass_at_k(correct, j) for j in range(1, k + 1)}
        sampled_score = sum(scores) / len(scores)
        for rec, group in zip(records, groups):
            rec["sample_scores"] = group
        if gens.greedy is not None:
            greedy_texts = gens.greedy.texts(tok)
            g_scores = task.verify_batch([prompt_text(c) for c in gens.conversations], greedy_texts, row_columns(rows))
            if not task.graded:
                metrics["gold_accuracy"] = sum(s >= 1.0 for s in g_scores) / len(g_scores)
            metrics["gold_score"] = sum(g_scores) / len(g_scores)
            for rec, text, score in zip(records, greedy_texts, g_scores):
                rec["greedy"], rec["greedy_score"] = text, score
        elif not task.graded:
            metrics["gold_accuracy"], metrics["gold_score"] = pass_at["pass@1"], sampled_score
        metrics.update(pass_at)
        # the headline: a graded score by its mean over samples, a right / wrong one by sampled accuracy (pass@1);
        # either with its standard error over prompts (each prompt's mean over its samples is one observation)
        metrics["sampled_gold_score"] = sampled_score
        metrics["sampled_gold_score_se"] = mean_and_stderr([sum(g) / len(g) for g in groups])[1]
        metrics["measure"] = "sampled_gold_score" if task.graded else "pass@1"

    if cfg.reward.model or cfg.reward.function or cfg.reward.task:
        source = build_reward(cfg.reward, device=device, tokenizer=tok, dtype=cfg.dtype,
                              attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
        metrics["reward"] = float(source(convs_per_sample, sampled_texts, columns=columns_per_sample).mean())

    if cfg.ref_model:
        ref = load_causal_lm(cfg.ref_model, dtype=cfg.dtype, device=device, tokenizer=tok,
                             attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code).eval()
        temp = cfg.rollout.temperature if cfg.rollout.temperature > 0 else 1.0
        batch = gens.sampled.to(device)
        logp = response_logprobs(model, batch, temperature=temp, batch_size=cfg.batch_size)  # (N, R)
        ref_logp = response_logprobs(ref, batch, temperature=temp, batch_size=cfg.batch_size)  # (N, R)
        metrics["kl"] = float(sequence_kl(logp, ref_logp, batch.response_mask).mean())

    metrics["length"] = float(lengths.mean())
    metrics["eos_rate"] = float(gens.sampled.ended_with_eos.float().mean())
    metrics["num_prompts"], metrics["num_samples"] = len(gens.conversations), k
    return metrics, records


# --------------------------------------------------------------------------- data metrics


def data_perplexity(cfg: EvalConfig, model, tok, device) -> float:
    """exp(token-mean NLL) over the target tokens of every row of ``data`` (assistant turns, or all text)."""
    examples, stats = load_examples(list(cfg.data), "sft")
    items = tokenize_examples(tok, examples, max_length=cfg.max_length, stats=stats)
    if not items:
        raise DataError(f"no row fits max_length={cfg.max_length} ({stats.summary()})", source=", ".join(cfg.data))
    nll, n = 0.0, 0
    for i in range(0, len(items), cfg.batch_size):
        batch = collate_sft(items[i: i + cfg.batch_size], tok.pad_token_id).to(device)
        with torch.no_grad():
            logp = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.position_ids)  # (B, T-1)
        mask = batch.labels[:, 1:] != IGNORE  # (B, T-1)
        nll -= float(logp[mask].sum())
        n += int(mask.sum())
    return perplexity(nll, n)


def classifier_metrics(cfg: EvalConfig, device) -> dict:
    """Accuracy and macro-F1 of a sequence classifier's argmax on the labelled ``data`` rows."""
    if not cfg.data:
        raise ConfigError("a sequence classifier is evaluated on labelled rows: set `data` (e.g. classify.jsonl)")
    if cfg.task or cfg.prompts or cfg.ref_model:
        raise ConfigError("task / prompts / ref_model need a causal LM; this model folder is a sequence classifier")
    tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    config = load_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    names = [config.id2label[i] for i in range(config.num_labels)]
    model = load_sequence_classifier(cfg.model, num_labels=config.num_labels, id2label=names, dtype=cfg.dtype,
                                     device=device, tokenizer=tok, attn_implementation=cfg.attn_implementation,
                                     trust_remote_code=cfg.trust_remote_code).eval()
    examples, stats = load_examples(list(cfg.data), "classification", labels=names)
    label2id = {name: i for i, name in enumerate(names)}
    items = tokenize_examples(tok, examples, max_length=cfg.max_length, stats=stats, label2id=label2id)
    preds, labels = [], []
    for i in range(0, len(items), cfg.batch_size):
        batch = collate_classification(items[i: i + cfg.batch_size], tok.pad_token_id).to(device)
        with torch.no_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        preds += logits.argmax(-1).tolist()  # (B,)
        labels += batch.labels.tolist()
    return {"accuracy": accuracy(preds, labels), "macro_f1": macro_f1(preds, labels), "num_examples": len(labels)}


# --------------------------------------------------------------------------- command


def check_config(cfg: EvalConfig) -> None:
    if cfg.num_samples < 1:
        raise ConfigError(f"num_samples must be >= 1 (samples per prompt for pass@k), got {cfg.num_samples}")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {cfg.batch_size}")
    generates = bool(cfg.task or cfg.prompts)
    if not generates and not cfg.data:
        raise ConfigError("nothing to evaluate: set `task` (held-out prompts + verifier), `prompts` or `data`")
    if not generates and (cfg.ref_model or cfg.reward.model or cfg.reward.function or cfg.reward.task):
        raise ConfigError("ref_model and reward.* score sampled responses: set `task` or `prompts` too")


def evaluate(cfg: EvalConfig) -> dict:
    """Every metric the config asks for (module docstring), as a dict; also written to eval.json."""
    check_config(cfg)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = default_device()
    records: list[dict] = []
    if is_classifier(cfg.model, cfg.trust_remote_code):
        metrics = classifier_metrics(cfg, device)
    else:
        tok = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = load_causal_lm(cfg.model, dtype=cfg.dtype, device=device, tokenizer=tok,
                               attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code).eval()
        metrics = {}
        if cfg.task or cfg.prompts:
            gens = generate(cfg, model, tok, *held_out_rows(cfg))
            metrics, records = generation_metrics(cfg, model, tok, gens, device)
            moved = bool(cfg.ref_model) and Path(cfg.ref_model).resolve() != Path(cfg.model).resolve()
            warnings = eval_warnings({**metrics, "samples": records})
            warnings += paired_warnings([], [], kl=metrics["kl"]) if moved and "kl" in metrics else []
            metrics["warnings"] = [str(w) for w in warnings]
        if cfg.data:
            metrics["perplexity"] = data_perplexity(cfg, model, tok, device)
    metrics["eval_seconds"] = time.perf_counter() - start
    write_json({**metrics, "samples": records}, Path(cfg.output) if cfg.output else Path(cfg.model) / "eval.json")
    return metrics


def write_json(obj: dict, path: Path) -> Path:
    """Write ``obj`` as JSON via a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def format_table(metrics: dict) -> str:
    """Two aligned columns, metric and value."""
    shown = {k: v for k, v in metrics.items() if k != "warnings"}
    width = max(len(k) for k in shown)
    rows = []
    for key, value in shown.items():
        shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else str(value)
        rows.append(f"{key:<{width}}  {shown}")
    return "\n".join(rows)


def main(cfg: EvalConfig) -> dict:
    metrics = evaluate(cfg)
    print(format_table(metrics))
    for warning in metrics.get("warnings", []):
        print(f"WARNING {warning}")
    print(f"wrote {Path(cfg.output) if cfg.output else Path(cfg.model) / 'eval.json'}", flush=True)
    return metrics
