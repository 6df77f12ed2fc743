"""A/B measurements of issue 17's speed levers, one lever at a time, side by side in one process.

    .venv/bin/python bench/levers.py [--repeats 5] [--sizes tiny,small] [--only prefill,reference,compile]

- prefill: a GRPO-shaped rollout (8 prompts x 8 samples of the arithmetic task's chat prompts, 24 new tokens,
  T = 1) with the group's prefill shared (`Sampler(share_prefill=True)`, the default) against one prefill per row;
  the two produce the same tokens (checked here, and in tests/rollout/test_sampler_families.py).
- reference: `recipes.ppo.make_experience` (old log-probs from the sampler, reference pass, critic pass) at
  kl_coef 0 (no reference pass) against kl_coef 0.05, 64 episodes.
- compile: one SFT-shaped training step (forward, backward, AdamW) of the model eager against `torch.compile`d,
  8 rows x 128 tokens: the compile time (first compiled step) and the per-step time after it, and the number of
  steps after which compiling pays back.

Timing is process CPU time (`resource.getrusage` user + system) of each measured call, A and B interleaved, the
median over repeats; on a machine shared with other work, CPU time suffers less than wall time from waiting for a
core (it still counts the cache and memory-bandwidth contention). Prints one markdown table per lever.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn):
    c0, w0 = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, cpu_seconds() - c0, time.perf_counter() - w0


def ab(a, b, repeats: int) -> dict:
    """Interleaved A/B: medians of CPU and wall seconds, and B / A ratios (B the baseline: > 1 means A is faster)."""
    rows = {"a_cpu": [], "b_cpu": [], "a_wall": [], "b_wall": []}
    a(), b()  # warm-up: allocator, first-call paths
    for _ in range(repeats):
        for name, fn in (("a", a), ("b", b)):
            _, c, w = timed(fn)
            rows[f"{name}_cpu"].append(c)
            rows[f"{name}_wall"].append(w)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {**med, "cpu_ratio": med["b_cpu"] / med["a_cpu"], "wall_ratio": med["b_wall"] / med["a_wall"]}


def model_folder(size: str, work: Path) -> Path:
    from posttrain.models.tiny import build_tiny_model

    out = work / f"model-{size}"
    if not (out / "config.json").exists():
        build_tiny_model(out, size=size)
    return out


def chat_prompts(tok, n: int) -> list[list[int]]:
    from posttrain.tasks import get_task

    with tempfile.TemporaryDirectory() as d:
        get_task("arithmetic").generate(Path(d), seed=0, n_train=n, n_eval=1, noise=0.0, difficulty=1)
        import json
        rows = [json.loads(line) for line in (Path(d) / "prompts.jsonl").read_text().splitlines()[:n]]
    texts = [tok.apply_chat_template(r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]}],
                                     add_generation_prompt=True, tokenize=False) for r in rows]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def lever_prefill(folder: Path, repeats: int) -> dict:
    from posttrain.config import RolloutConfig
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.rollout import Sampler

    tok = load_tokenizer(folder)
    model = load_causal_lm(folder, tokenizer=tok).eval()
    prompts = chat_prompts(tok, 8)
    cfg = RolloutConfig(max_new_tokens=24, temperature=1.0)
    run = lambda share: Sampler(model, tok, cfg, share_prefill=share).generate(  # noqa: E731
        prompts, num_samples=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(run(True).sequences, run(False).sequences)
    out = ab(lambda: run(True), lambda: run(False), repeats)
    out["prompt_tokens"] = statistics.mean(len(p) for p in prompts)
    return out


def lever_reference(folder: Path, repeats: int) -> dict:
    from posttrain.config import PPOConfig, RolloutConfig
    from posttrain.engine.dist import RolloutShare
    from posttrain.models import load_tokenizer
    from posttrain.recipes.ppo import load_models, make_experience
    from posttrain.rollout import Sampler

    tok = load_tokenizer(folder)
    cfg = PPOConfig(model=str(folder), critic_init="policy",
                    rollout=RolloutConfig(batch_size=64, samples_per_prompt=4, max_new_tokens=24, temperature=1.0))
    models = load_models(cfg, tok, torch.device("cpu"))
    batch = Sampler(models.policy, tok, cfg.rollout).generate(chat_prompts(tok, 16), num_samples=4,
                                                              generator=torch.Generator().manual_seed(0))
    scores, share = torch.zeros(64), RolloutShare(16, 4, None)
    run = lambda kl: make_experience(cfg, models, batch, scores, kl, None, share, sampled_logp=batch.logprobs)  # noqa: E731
    return ab(lambda: run(0.0), lambda: run(0.05), repeats)


def lever_compile(folder: Path, repeats: int) -> dict:
    from posttrain.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(folder)
    ids = torch.randint(4, len(tok), (8, 128), generator=torch.Generator().manual_seed(0))

    def stepper(compiled: bool):
        model = load_causal_lm(folder, tokenizer=tok).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        fwd = torch.compile(model) if compiled else model

        def step():
            loss = fwd(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    eager, comp = stepper(False), stepper(True)
    _, first_cpu, first_wall = timed(comp)  # compiles forward and backward
    out = ab(comp, eager, repeats)
    saved = out["b_wall"] - out["a_wall"]
    out["compile_wall"], out["compile_cpu"] = first_wall, first_cpu
    out["break_even_steps"] = (first_wall - out["b_wall"]) / saved if saved > 0 else float("inf")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="tiny")
    ap.add_argument("--only", default="prefill,reference,compile")
    ap.add_argument("--work", default=str(Path(__file__).parent / "work"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"# levers: {time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {os.cpu_count()} cores\n")
    levers = {"prefill": lever_prefill, "reference": lever_reference, "compile": lever_compile}
    for size in args.sizes.split(","):
        folder = model_folder(size, work)
        for name in args.only.split(","):
            r = levers[name](folder, args.repeats)
            print(f"## {name}, {size}\n")
            print("| | A (lever on) | B (off) | B / A |\n|---|---|---|---|")
            print(f"| CPU s (median) | {r['a_cpu']:.4f} | {r['b_cpu']:.4f} | {r['cpu_ratio']:.2f}x |")
            print(f"| wall s (median) | {r['a_wall']:.4f} | {r['b_wall']:.4f} | {r['wall_ratio']:.2f}x |")
            extra = {k: v for k, v in r.items() if k not in ("a_cpu", "b_cpu", "a_wall", "b_wall", "cpu_ratio", "wall_ratio")}
            if extra:
                print("\n" + ", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}" for k, v in extra.items()))
            print(f"\nload average after: {os.getloadavg()}\n", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
