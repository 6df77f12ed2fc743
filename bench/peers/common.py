"""Shared plumbing of the peer scripts: arguments, threads, timing callback, result JSON.

Every peer script writes one JSON object to ``--out``:

    {"steps", "tokens", "wall_s", "peak_rss_mb", "final_loss", "params", ...extras}

- steps: optimizer steps taken (PPO: PPO iterations, one rollout batch each).
- tokens: non-pad tokens that went through the model in the training forward passes
  (SFT: the batch; RM/DPO: chosen + rejected rows; PPO: prompt + response through the first EOS,
  once per episode).
- wall_s: the training loop only: from the start of the first step to the end of the last
  (TrainerCallback on_step_begin / on_step_end; PPO: on_train_begin, which the PPO loop calls
  right before its first iteration). Model loading and dataset tokenization are outside it.
  On CUDA both ends wait for the GPU (``torch.cuda.synchronize``), since kernels run behind Python.
- peak_rss_mb: the process's resident-set high-water mark (getrusage ru_maxrss), the same number
  ``/usr/bin/time -v`` prints as "Maximum resident set size".
- peak_gpu_mb (``--device cuda`` only): ``torch.cuda.max_memory_allocated``, the caching allocator's
  high-water mark of allocated bytes, in MiB.
- final_loss: the last logged training loss (TRL logs the mean over the logging window).
- params: parameters of the trained model (PPO: policy + value model).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="model folder (weights + tokenizer)")
    ap.add_argument("--data", required=True, help="jsonl rows (sft.jsonl / prefs.jsonl / prompts.jsonl)")
    ap.add_argument("--out", required=True, help="where to write the result JSON")
    ap.add_argument("--work-dir", default="", help="scratch output_dir for the trainer (default: beside --out)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences (pairs for RM/DPO) per optimizer step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10, help="logging_steps")
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on",
                    help="TrainingArguments.gradient_checkpointing (on: TRL 1.16's default; the harness sets it as "
                         "posttrain's side runs)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: float32 (the CPU benchmark); cuda: weights in bfloat16 and bf16=True (autocast), "
                         "as posttrain's dtype=bfloat16")
    return ap


def model_dtype(args: argparse.Namespace):
    """Weights' dtype: float32 on the CPU, bfloat16 on CUDA (posttrain's dtype=bfloat16 loads them so too)."""
    import torch

    return torch.bfloat16 if args.device == "cuda" else torch.float32


def _sync() -> None:
    """Wait for queued CUDA kernels, so that a wall-clock read means the GPU work before it is done."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def setup(args: argparse.Namespace) -> Path:
    """Threads and seeds before any model work; returns the scratch folder."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir) if args.work_dir else Path(args.out).with_suffix(".work")
    work.mkdir(parents=True, exist_ok=True)
    return work


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def as_conversation(row: dict) -> dict:
    """posttrain's string preference/prompt form -> TRL's conversational form (same chat template)."""
    def user(x):
        return [{"role": "user", "content": x}] if isinstance(x, str) else x

    def assistant(x):
        return [{"role": "assistant", "content": x}] if isinstance(x, str) else x

    out = {"prompt": user(row["prompt"])}
    for k in ("chosen", "rejected"):
        if k in row:
            out[k] = assistant(row[k])
    return out


def make_callback():
    """A TrainerCallback that times the loop and keeps the last logged loss."""
    from transformers import TrainerCallback

    class BenchCallback(TrainerCallback):
        def __init__(self) -> None:
            self.t_begin: float | None = None  # on_train_begin
            self.t_first: float | None = None  # on_step_begin of the first step (Trainer loops only)
            self.t1: float | None = None  # on_step_end of the last step
            self.steps = 0
            self.last_loss: float | None = None
            self.logs: list[dict] = []

        @property
        def wall_s(self) -> float:
            t0 = self.t_first if self.t_first is not None else self.t_begin
            return (self.t1 or t0) - t0

        def on_train_begin(self, args, state, control, **kw):
            _sync()
            self.t_begin = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            if self.t_first is None:
                _sync()
                self.t_first = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps += 1
            if state.max_steps and state.global_step >= state.max_steps:
                _sync()  # the last step: its kernels must have finished (earlier steps are left asynchronous)
            self.t1 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                self.logs.append(dict(logs))
                if "loss" in logs:
                    self.last_loss = float(logs["loss"])

    return BenchCallback()


def counting(trainer_cls, keys: tuple[str, ...] = ("attention_mask",)):
    """Subclass a transformers Trainer so it counts the non-pad tokens of every training batch.

    TRL 1.16's SFT, reward and DPO collators return one ``attention_mask`` over the whole (concatenated)
    batch; the ORPO / CPO collators one per side (``keys`` = chosen_attention_mask, rejected_attention_mask,
    each over prompt + completion). Counting costs one integer sum per micro-step. The sums are added up
    where the mask lives and read once at the end, so on CUDA the count adds no synchronisation to a step.
    """

    class Counting(trainer_cls):
        _token_sum = 0  # a 0-d tensor after the first step

        @property
        def bench_tokens(self) -> int:
            return int(Counting._token_sum)

        def training_step(self, model, inputs, *a, **k):
            Counting._token_sum = Counting._token_sum + sum(inputs[k].sum() for k in keys)
            return super().training_step(model, inputs, *a, **k)

    Counting.__name__ = trainer_cls.__name__
    return Counting


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def n_params(*models) -> int:
    return sum(p.numel() for m in models for p in m.parameters())


def write_result(path: str, *, steps: int, tokens: int, wall_s: float, final_loss: float | None, params: int,
                 **extra) -> dict:
    import torch

    res = {"steps": steps, "tokens": tokens, "wall_s": wall_s, "peak_rss_mb": peak_rss_mb(),
           "final_loss": final_loss, "params": params, **extra}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(p)
    print(json.dumps(res), file=sys.stderr)
    return res


def common_training_args(args: argparse.Namespace, work: Path) -> dict:
    """TrainingArguments shared by the three Trainer-based peers: float32 on the CPU (bf16 on CUDA), no eval,
    no saving."""
    return dict(
        output_dir=str(work),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=args.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=args.device == "cuda",
        fp16=False,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing == "on",
    )
