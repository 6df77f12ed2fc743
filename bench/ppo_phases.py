"""Where a PPO iteration's time goes, posttrain and TRL 1.12 side by side (the profile behind results.md).

    .venv/bin/python bench/ppo_phases.py [--results bench/results.md] [--case ppo-tiny] [--repeats 3]

Reruns the two commands `bench/run.py` recorded for a PPO case (the "Exact commands" of a results file, whose
model and data folders must still be under bench/work), alternating the sides, each with a phase timer: the functions of each side's PPO loop are wrapped (no code changes, nothing else
timed), and the medians over the runs are printed as one markdown table. The phases are matched by what they
compute: sampling, the no-grad scoring passes, the training forward + loss, backward, optimizer step, and on the
TRL side its explicit `gc.collect()` / `empty_cache()` calls. Rows a side does not have are left empty.

Each side runs in its own interpreter (posttrain's `.venv`, the peer venv), in this same file: `--side posttrain
-- <posttrain args>` / `--side trl -- <peer script and args>` print one JSON of {phase: seconds}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T: dict[str, float] = collections.defaultdict(float)
PHASES = [  # (row label, posttrain key, TRL key)
    ("sampling (KV-cached generation)", "sample", "generate"),
    ("reference log-probs", "ref", "ref forward"),
    ("values + reward scores (no grad)", "score", "value+reward"),
    ("training forward + loss (policy + value)", "train forward", "train forward"),
    ("backward", "backward", "backward"),
    ("optimizer step (+ clipping)", "optimizer", "optimizer"),
    ("explicit gc.collect / empty_cache", "", "gc"),
    ("whole loop", "loop", "loop"),
]


def timed(name: str, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            T[name] += time.perf_counter() - t
    return wrapper


def posttrain_side(argv: list[str]) -> None:
    import torch

    import posttrain.engine.step as step
    import posttrain.recipes.ppo as R
    from posttrain.cli import main

    R.Sampler.generate = timed("sample", R.Sampler.generate)
    build_reward = R.build_reward
    R.build_reward = lambda *a, **k: timed("score", build_reward(*a, **k))
    response_logprobs, response_values = R.response_logprobs, R.response_values

    # the scoring passes run with no grad; the training ones record a graph
    def logprobs(model, *a, **k):
        return timed("train forward" if torch.is_grad_enabled() else "ref", response_logprobs)(model, *a, **k)

    def values(critic, *a, **k):
        return timed("train forward" if torch.is_grad_enabled() else "score", response_values)(critic, *a, **k)

    R.response_logprobs, R.response_values = logprobs, values
    R.rollout_and_score = timed("loop-rollout", R.rollout_and_score)
    R.make_experience = timed("loop-experience", R.make_experience)
    R.ppo_update = timed("loop-update", R.ppo_update)
    torch.Tensor.backward = timed("backward", torch.Tensor.backward)
    torch.optim.AdamW.step = timed("optimizer", torch.optim.AdamW.step)
    step.torch.nn.utils.clip_grad_norm_ = timed("optimizer", torch.nn.utils.clip_grad_norm_)
    try:
        main(argv)
    except SystemExit as e:  # the CLI's exit status
        if e.code:
            raise
    T["loop"] = sum(T.pop(k, 0.0) for k in ("loop-rollout", "loop-experience", "loop-update"))
    print("PHASES " + json.dumps(dict(T)), flush=True)


def trl_side(argv: list[str]) -> None:
    import gc
    import runpy

    import accelerate
    import torch
    from trl.experimental.ppo import ppo_trainer as M

    M.gc.collect = timed("gc", gc.collect)
    M.empty_cache = timed("gc", M.empty_cache)
    M.batch_generation = timed("generate", M.batch_generation)
    forward = M.forward

    def fwd(model, *a, **k):  # the old log-probs come from the generation logits; `forward` runs ref or training
        name = "train forward" if isinstance(model, M.PolicyAndValueWrapper) else "ref forward"
        return timed(name, forward)(model, *a, **k)

    M.forward = fwd
    M.get_reward = timed("value+reward", M.get_reward)
    accelerate.Accelerator.backward = timed("backward", accelerate.Accelerator.backward)
    torch.optim.AdamW.step = timed("optimizer", torch.optim.AdamW.step)
    M.PPOTrainer.train = timed("loop", M.PPOTrainer.train)
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # the peer scripts end with `raise SystemExit(main())`
        if e.code:
            raise
    print("PHASES " + json.dumps(dict(T)), flush=True)


def run_side(cmd: list[str], side: str, env: dict) -> dict:
    """One timed run of a side: its interpreter runs this file with the side's own command line."""
    python, rest = cmd[0], cmd[1:]
    if side == "posttrain":
        python, rest = str(ROOT / ".venv" / "bin" / "python"), cmd[1:]  # cmd = [posttrain, ppo, ...]
    out = subprocess.run([python, __file__, "--side", side, "--", *rest], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} failed:\n{out.stderr[-2000:]}")
    return json.loads(next(x for x in reversed(out.stdout.splitlines()) if x.startswith("PHASES "))[len("PHASES "):])


def recorded_commands(results: Path, case: str) -> tuple[list[str], list[str], str]:
    """(posttrain command, peer command, OMP threads) of `case` from a results file's "Exact commands" block: the
    two lines after `# <case>`, without their leading VAR=value environment words."""
    lines = results.read_text().splitlines()
    try:
        at = lines.index(f"# {case}")
    except ValueError:
        raise SystemExit(f"{results}: no `# {case}` in its exact commands") from None
    cmds, threads = [], "1"
    for line in lines[at + 1: at + 3]:
        words = shlex.split(line)
        env = [w for w in words if "=" in w.split("/")[0] and w[0].isupper()]
        threads = next((w.split("=", 1)[1] for w in env if w.startswith("OMP_NUM_THREADS=")), threads)
        cmds.append(words[len(env):])
    return cmds[0], cmds[1], threads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=["posttrain", "trl"])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results.md"))
    ap.add_argument("--case", default="ppo-tiny")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    if a.side == "posttrain":
        posttrain_side(rest)
        return 0
    if a.side == "trl":
        trl_side(rest)
        return 0
    posttrain_cmd, peer_cmd, threads = recorded_commands(Path(a.results), a.case)
    runs: dict[str, list[dict]] = {"posttrain": [], "trl": []}
    for _ in range(a.repeats):
        for side, cmd in (("posttrain", posttrain_cmd), ("trl", peer_cmd)):
            env = {**os.environ, "OMP_NUM_THREADS": threads}
            runs[side].append(run_side(cmd, side, env))
    med = {s: {k: statistics.median(r.get(k, 0.0) for r in rs) for k in set().union(*rs)} for s, rs in runs.items()}
    print(f"{a.case}, medians of {a.repeats} runs a side, {threads} threads, seconds over the whole run:\n")
    print("| phase | posttrain s | TRL 1.12 s |\n|---|---:|---:|")
    for label, pk, tk in PHASES:
        cell = lambda side, key: f"{med[side][key]:.2f}" if key and key in med[side] else ""  # noqa: E731
        print(f"| {label} | {cell('posttrain', pk)} | {cell('trl', tk)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
