"""The report of `posttrain demo`: its intro paragraph, the "what this shows" text written from the numbers (each
method against SFT, +- standard error), and the wall time of every stage; the tables and plots are `write_report`'s.
`posttrain.recipes.demo` runs the stages and calls `write_demo_report` with their folders and times."""

from __future__ import annotations

import json
import math
from pathlib import Path

from posttrain.config import DemoConfig
from posttrain.eval.metrics import mean_and_stderr
from posttrain.report import per_prompt, read_metrics, write_report

METHODS = ["sft", "ppo-rm", "ppo-verifier", "dpo", "sft+dpo", "dpo-iter",
           "kto", "orpo", "simpo"]  # the demo's runs, in the report's order


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def difference(a: dict, b: dict, key: str) -> tuple[float, float]:
    """(a - b, its standard error) of the gold measure ``key``. Paired over prompts when both eval.json files hold
    per-prompt records of the same prompts: SE = std(a_i - b_i) / sqrt(n), which the shared prompts make much
    smaller than an unpaired SE. Otherwise unpaired with the binomial bound, sqrt(2 p (1-p) / n) at the pooled p
    (p (1-p) bounds the variance of any [0, 1] score with mean p)."""
    d = a[key] - b[key]
    pa, pb = per_prompt(a, key), per_prompt(b, key)
    same = [r["prompt"] for r in a.get("samples", [])] == [r["prompt"] for r in b.get("samples", [])]
    if len(pa) > 1 and len(pa) == len(pb) and same:
        return d, mean_and_stderr([x - y for x, y in zip(pa, pb)])[1]
    p, n = (a[key] + b[key]) / 2, int(b.get("num_prompts") or 1)
    return d, math.sqrt(2 * max(p * (1 - p), 0.0) / max(n, 1))


def findings(evals: dict[str, dict], curves: dict[str, list[dict]], task: str) -> str:
    """The "what this shows" text, written from the numbers: a plain verdict per method against SFT, the details,
    then the paper's comparisons and over-optimisation of the reward model.

    The measure is held-out gold accuracy (greedy), or for sentiment the mean gold score (the share of positive
    words: SFT's continuations are never all positive). A difference is given +- one standard error
    (`difference`); it counts as real beyond two standard errors, anything smaller is called noise."""
    key = "gold_score" if task == "sentiment" else "gold_accuracy"
    what = "mean gold score" if task == "sentiment" else "gold accuracy"
    base = evals.get("sft", {})
    if key not in base:
        return "The SFT model has no evaluation, so nothing can be compared."
    n = int(base.get("num_prompts", 1))

    def verdict(name: str, ref: str = "sft") -> tuple[str, str] | None:
        a, b = evals.get(name, {}), evals.get(ref, {})
        if key not in a or key not in b:
            return None
        d, se = difference(a, b, key)
        kind = "better" if d > 2 * se else ("worse" if d < -2 * se else "noise")
        word = {"better": "improved on", "noise": "did NOT improve on",
                "worse": "did NOT improve on, and is worse than"}
        tail = " (the difference is within noise)" if kind == "noise" else ""
        return kind, (f"{word[kind]} {ref} ({what} {a[key]:.1%} vs {b[key]:.1%}, {100 * d:+.1f} ± {100 * se:.1f} "
                      f"points){tail}")

    groups: dict[str, list[str]] = {"better": [], "noise": [], "worse": [], "missing": []}
    details = []
    for name in METHODS[1:]:
        v = verdict(name)
        if v is None:
            groups["missing"].append(name)
            details.append(f"- {name}: no evaluation (the stage did not run).")
            continue
        ev = evals[name]
        d, se = difference(ev, base, key)
        groups[v[0]].append(f"{name} ({100 * d:+.1f} ± {100 * se:.1f} points)")
        details.append(f"- {name} {v[1]}; KL to SFT {ev.get('kl', float('nan')):.2f} nats, EOS rate "
                       f"{ev.get('eos_rate', float('nan')):.0%}.")
    heads = {"better": "Improved on SFT", "noise": "No measurable change from SFT (within noise)",
             "worse": "Worse than SFT", "missing": "Not evaluated"}
    lines = [f"**{heads[g]}:** {', '.join(groups[g]) or 'none'}.  " for g in heads if groups[g] or g == "better"]
    lines += ["", f"Measure: held-out {what}, greedy decoding, on {n} prompts; differences in percentage points ± one "
                  "standard error, paired over the same prompts; a method counts as better or worse only beyond two "
                  "standard errors.", "",
              f"- sft: {what} {base[key]:.1%} (greedy), pass@1 {base.get('pass@1', float('nan')):.1%} (sampled).",
              *details]
    if task != "sentiment" and "pass@1" in base:
        # RL optimises the sampling distribution, so the sampled accuracy is where it should show first.
        sampled = {"better": [], "noise": [], "worse": []}
        for name in METHODS[1:]:
            if "pass@1" in evals.get(name, {}):
                d, se = difference(evals[name], base, "pass@1")
                kind = "better" if d > 2 * se else ("worse" if d < -2 * se else "noise")
                sampled[kind].append(f"{name} ({100 * d:+.1f} ± {100 * se:.1f})")
        lines += ["", f"Sampled accuracy (pass@1 at the training temperature, {base.get('num_samples', 4)} samples per "
                      f"prompt; SFT {base['pass@1']:.1%}) — the distribution RL optimises: "
                      f"**above SFT:** {', '.join(sampled['better']) or 'none'}; "
                      f"**within noise:** {', '.join(sampled['noise']) or 'none'}; "
                      f"**below SFT:** {', '.join(sampled['worse']) or 'none'} (points ± SE, paired over prompts).", ""]
    for a, b, claim in (("ppo-verifier", "dpo", "PPO vs DPO (Xu et al. 2024 found PPO better)"),
                        ("dpo-iter", "dpo", "online DPO vs offline DPO (Xu et al.: DPO-Iter above DPO)"),
                        ("sft+dpo", "dpo", "an extra SFT stage on the chosen responses before DPO"),
                        ("kto", "dpo", "KTO on the same pairs unpaired vs DPO"),
                        ("orpo", "dpo", "ORPO (no reference model, no SFT stage) vs DPO"),
                        ("simpo", "dpo", "SimPO (no reference model) vs DPO")):
        v = verdict(a, b)
        if v is not None:
            lines.append(f"- {claim}: {a} {v[1]}.")
    rows = curves.get("ppo-rm", [])
    proxy = [r["objective/scores"] for r in rows if "objective/scores" in r]
    gold = [r["eval/gold_accuracy"] for r in rows if "eval/gold_accuracy" in r]
    if len(proxy) >= 2 and len(gold) >= 2:
        over = proxy[-1] > proxy[0] and gold[-1] < gold[0]
        lines.append(f"- ppo-rm: the reward model's score went {proxy[0]:.2f} -> {proxy[-1]:.2f} during training while "
                     f"held-out gold (greedy) went {gold[0]:.1%} -> {gold[-1]:.1%}"
                     + (": the policy over-optimised the proxy reward." if over else "."))
    return "\n".join(lines)


def parameter_count(model_dir: Path) -> int | None:
    """Parameters in a model folder's `model.safetensors`, from its header alone (8-byte length, then JSON)."""
    path = model_dir / "model.safetensors"
    if not path.is_file():
        return None
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def _rows(path: Path) -> int:
    return sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else 0


def intro(cfg: DemoConfig, out: Path, evals: dict[str, dict], seconds: dict[str, float]) -> str:
    """The paragraph under the title: what was run, on what, and how it was measured."""
    params = parameter_count(out / "sft" / "final")
    model = f"a {params / 1e3:,.0f}k-parameter" if params else "the tiny"
    base = evals.get("sft", {})
    example = base.get("samples", [{}])[0].get("prompt") if base.get("samples") else None
    task = f"the **{cfg.task}** task" + (f' (prompts like "{example}")' if example else "")
    if cfg.ablation:
        what = ("the PPO ablation of Xu et al. 2024 (Table 3): each config of `examples/ppo_ablation/` trained from "
                "the same SFT model")
    else:
        rm = ("a sentiment classifier on labelled texts as the reward model" if cfg.task == "sentiment" else
              f"a reward model on {_rows(out / 'task' / 'prefs.jsonl'):,} preference pairs")
        what = ("then from the SFT model: PPO with that reward model (**ppo-rm**), PPO with the task's verifier as the "
                "reward (**ppo-verifier**), offline DPO on the pairs (**dpo**), SFT on the chosen responses then DPO "
                "(**sft+dpo**), and iterative online DPO with pairs labelled by the verifier (**dpo-iter**)")
        what = f"{rm}, {what}"
    n, k = base.get("num_prompts", "?"), base.get("num_samples", "?")
    quick = " This is a `--quick` run: tiny step counts, so the numbers are noise." if cfg.quick else ""
    return (f"The demo post-trained {model} Llama model (built locally by `posttrain tiny-model`) on {task}: SFT on "
            f"{_rows(out / 'task' / 'sft.jsonl'):,} demonstrations, {what}. Every model was scored on the same {n} "
            f"held-out prompts: greedy gold accuracy, {k} samples per prompt for pass@k, the reward model's score and "
            f"the KL to the SFT model. The whole run took {sum(seconds.values()):,.0f} s; the table's wall time is "
            f"each method's training (sft+dpo's includes its SFT-on-chosen stage), every stage's is at the end.{quick}")


def stage_table(seconds: dict[str, float]) -> str:
    lines = ["| stage | wall time (s) |", "|---|---:|"]
    lines += [f"| {name} | {s:.1f} |" for name, s in seconds.items()]
    lines.append(f"| total | {sum(seconds.values()):.1f} |")
    return "\n".join(lines)


def write_demo_report(cfg: DemoConfig, report_dir: Path, out: Path, runs: list[str], seconds: dict[str, float]) -> Path:
    names = [Path(r).name for r in runs]
    evals = {n: _read(out / r / "eval.json") for n, r in zip(names, runs)}
    curves = {n: read_metrics(out / r) for n, r in zip(names, runs)}
    title = (f"posttrain demo: {cfg.task}" + (" (PPO ablation)" if cfg.ablation else "")
             + (" (--quick)" if cfg.quick else ""))
    wall = {n: seconds[r] for n, r in zip(names, runs) if r in seconds}
    if "sft+dpo" in wall:
        wall["sft+dpo"] += seconds.get("sft-chosen", 0.0)  # the method is both stages
    extra = [] if cfg.ablation or not (out / "rm").is_dir() else [out / "rm"]  # the reward model's curves
    return write_report([out / r for r in runs], report_dir, title=title, intro=intro(cfg, out, evals, seconds),
                        findings=None if cfg.ablation else findings(evals, curves, cfg.task), wall_times=wall,
                        curve_runs=extra, extra_sections={"Wall time per stage": stage_table(seconds)})
