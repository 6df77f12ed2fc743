"""What the demo's numbers can support: degenerate evidence per method, effects over seeds, and the claims table.

Estimator. For one seed, the effect of method a over method b is a paired difference over the same held-out
prompts (a's mean minus b's on the task's measure) with the paired standard error over prompts. Over S >= 2 seeds
the effect is the mean of the S per-seed differences and its standard error their standard deviation over
sqrt(S): that spread carries the prompt-level noise and the run-to-run spread (initialisation, data order,
sampling, CPU kernels) together, which the prompt-level SE alone misses. A difference counts when it lies beyond
t * SE, t the two-sided 95% Student-t critical value for S - 1 degrees of freedom (4.30 for 3 seeds, 2.78 for
5): few seeds buy little certainty, and the verdicts say so rather than hide it. One seed: t = 2 on the prompt-level
SE, and the verdicts are indicative only (a single seed's verdict has been seen to flip on another machine).

Before any verdict the evidence is checked (``posttrain.eval.health``): a comparison with a blocking warning
(zero-variance differences, an unchanged evaluation, an EOS collapse) gets "no verdict" and the warning instead.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from posttrain.eval.health import HealthWarning, blocking, eval_warnings, kl_outliers, paired_warnings
from posttrain.eval.metrics import mean_and_stderr
from posttrain.report import per_prompt, read_metrics

# two-sided 95% Student-t critical values by degrees of freedom (1..30); 1.96 beyond
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
ABLATION = ["1_baseline", "2_adv_norm", "3_large_batch", "4_ref_ema"]  # examples/ppo_ablation/, Xu et al. Table 3
CLASSIFY = ["head", "top2", "all", "lora"]  # recipes.demo.CLASSIFY


def t_critical(df: int) -> float:
    return T975[df - 1] if 1 <= df <= len(T975) else 1.96


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------- one seed's evidence


def same_prompts(a: dict, b: dict) -> bool:
    pa, pb = [r["prompt"] for r in a.get("samples", [])], [r["prompt"] for r in b.get("samples", [])]
    return len(pa) > 1 and pa == pb


def difference(a: dict, b: dict, key: str) -> tuple[float, float]:
    """(a - b, its standard error) of the gold measure ``key``. Paired over prompts when both eval.json files hold
    per-prompt records of the same prompts: SE = std(a_i - b_i) / sqrt(n), which the shared prompts make much
    smaller than an unpaired SE. Otherwise unpaired with the binomial bound, sqrt(2 p (1-p) / n) at the pooled p
    (p (1-p) bounds the variance of any [0, 1] score with mean p)."""
    d = a[key] - b[key]
    pa, pb = per_prompt(a, key), per_prompt(b, key)
    if len(pa) > 1 and len(pa) == len(pb) and same_prompts(a, b):
        return d, mean_and_stderr([x - y for x, y in zip(pa, pb)])[1]
    p, n = (a[key] + b[key]) / 2, int(b.get("num_prompts") or 1)
    return d, math.sqrt(2 * max(p * (1 - p), 0.0) / max(n, 1))


def method_warnings(evals: dict[str, dict], key: str, base: str = "sft") -> dict[str, list[HealthWarning]]:
    """Every named warning of each evaluated run (``posttrain.eval.health``): its own evaluation's, its paired
    comparison with ``base`` on ``key``, and a KL far outside the other methods'. One warning per name."""
    ref = evals.get(base, {})
    kls = {n: float(ev["kl"]) for n, ev in evals.items() if n != base and _num(ev.get("kl"))}
    outliers = kl_outliers(kls)
    out: dict[str, list[HealthWarning]] = {}
    for name, ev in evals.items():
        if not ev:
            continue
        found = eval_warnings(ev)
        if name != base and ref:
            paired = same_prompts(ev, ref)
            found += paired_warnings(per_prompt(ev, key) if paired else [], per_prompt(ref, key) if paired else [],
                                     kl=ev.get("kl") if _num(ev.get("kl")) else None,
                                     eos=ev.get("eos_rate"), base_eos=ref.get("eos_rate"))
            found += [outliers[name]] if name in outliers else []
        names: set[str] = set()
        out[name] = [w for w in found if not (w.name in names or names.add(w.name))]
    return out


# --------------------------------------------------------------------------- effects over seeds


@dataclass
class Effect:
    """An effect over seeds (module docstring): mean, SE, the per-seed values, the t multiplier, and the blocking
    warnings seen in any seed (as "seed S: warning")."""

    value: float
    se: float
    per_seed: list[float]
    t: float
    blocked: list[str] = field(default_factory=list)

    def verdict(self, sign: int = 1) -> str:
        """reproduced / not reproduced / within noise for a claim that the effect has sign ``sign``."""
        if self.blocked:
            return "no verdict (degenerate evidence)"
        if math.isnan(self.se):
            return ("reproduced" if sign * self.value > 0 else "not reproduced") + " (one seed, no SE: indicative)"
        margin = self.t * self.se
        word = ("reproduced" if sign * self.value > margin else
                "not reproduced (the opposite)" if sign * self.value < -margin else "within noise")
        return word + (" (one seed: indicative)" if len(self.per_seed) == 1 else "")

    def shown(self, scale: float = 100.0, unit: str = " points", digits: int = 1) -> str:
        se = "n/a" if math.isnan(self.se) else f"{scale * self.se:.{digits}f}"
        return f"{scale * self.value:+.{digits}f} ± {se}{unit}"


def combine(per_seed: list[tuple[float, float]], blocked: list[str] = ()) -> Effect | None:
    """Effect from per-seed (difference, prompt-level SE) pairs: over seeds when there are two or more."""
    if not per_seed:
        return None
    values = [d for d, _ in per_seed]
    if len(values) >= 2:
        mean, se = mean_and_stderr(values)
        return Effect(mean, se, values, t_critical(len(values) - 1), list(blocked))
    return Effect(values[0], per_seed[0][1], values, 2.0, list(blocked))


@dataclass
class Seed:
    """One seed's folder of the demo: its evaluations (methods, `ablation/NAME`) and wall times."""

    seed: int
    folder: Path
    evals: dict[str, dict]
    seconds: dict[str, float]


def load_seed(seed: int, folder: Path, methods: list[str]) -> Seed:
    runs = methods + [f"ablation/{a}" for a in ABLATION]
    evals = {r: _read(folder / r / "eval.json") for r in runs}
    seconds = _read(folder / "demo.json").get("seconds", {})
    return Seed(seed, folder, {r: ev for r, ev in evals.items() if ev}, seconds)


def measure_key(evals: dict[str, dict], task: str) -> str:
    """The headline measure: what eval.json names (``measure``), else greedy accuracy (graded task: greedy score)."""
    base = evals.get("sft", {})
    return base.get("measure") or ("gold_score" if task == "sentiment" else "gold_accuracy")


def paired_effect(seeds: list[Seed], a: str, b: str, key: str) -> Effect | None:
    """a - b on ``key`` over the seeds that evaluated both (module docstring)."""
    per_seed, blocked = [], []
    for s in seeds:
        ea, eb = s.evals.get(a, {}), s.evals.get(b, {})
        if not (_num(ea.get(key)) and _num(eb.get(key))):
            continue
        per_seed.append(difference(ea, eb, key))
        paired = same_prompts(ea, eb)
        ws = paired_warnings(per_prompt(ea, key) if paired else [], per_prompt(eb, key) if paired else [],
                             eos=ea.get("eos_rate"), base_eos=eb.get("eos_rate"))
        ws += [w for w in eval_warnings(ea) if w.name == "eos-collapse"]
        blocked += [f"seed {s.seed}: {w}" for w in blocking(ws)]
    return combine(per_seed, blocked)


def metric_effect(seeds: list[Seed], values: list[tuple[int, float]]) -> Effect | None:
    """An effect measured once per seed (no prompt-level SE): mean +- SE over seeds, none for one seed."""
    if not values:
        return None
    xs = [v for _, v in values]
    if len(xs) == 1:
        return Effect(xs[0], float("nan"), xs, 2.0)
    mean, se = mean_and_stderr(xs)
    return Effect(mean, se, xs, t_critical(len(xs) - 1))


def last(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if _num(r.get(key))]
    return float(vals[-1]) if vals else None


def classify_accuracy(folder: Path, variant: str) -> tuple[float, int] | None:
    """(held-out accuracy at the end, eval rows) of the demo's classification run `classify/variant`."""
    rows = read_metrics(folder / "classify" / variant)
    acc = last(rows, "eval_accuracy")
    n = next((int(r["data/eval_rows"]) for r in rows if _num(r.get("data/eval_rows"))), 0)
    return None if acc is None else (acc, n)


def classify_effect(seeds: list[Seed], a: str, b: str) -> Effect | None:
    """Accuracy of variant a minus variant b, paired by seed; one seed: the unpaired binomial SE."""
    per_seed = []
    for s in seeds:
        ra, rb = classify_accuracy(s.folder, a), classify_accuracy(s.folder, b)
        if ra and rb:
            p, n = (ra[0] + rb[0]) / 2, max(rb[1], 1)
            per_seed.append((ra[0] - rb[0], math.sqrt(2 * max(p * (1 - p), 0.0) / n)))
    return combine(per_seed)


# --------------------------------------------------------------------------- the claims table


def claims(seeds: list[Seed], key: str, what: str) -> list[tuple[str, str, str, Effect | None, str, str]]:
    """(claim, source, how it is measured, effect, effect shown, verdict) for every claim the demo can test."""
    rows = []

    def add(claim, source, how, effect, sign=1, scale=100.0, unit=" points", note="", digits=1):
        shown = (effect.shown(scale, unit, digits) + note) if effect else "not run"
        verdict = effect.verdict(sign) if effect else "not measured"
        if effect and effect.blocked:
            verdict += ": " + "; ".join(effect.blocked)
        rows.append((claim, source, how, effect, shown, verdict))

    add("PPO beats DPO on a verifiable task", "Xu et al. 2024, Table 3 (CodeContests: PPO 22.4, DPO 0.0)",
        f"ppo-verifier − dpo, {what}", paired_effect(seeds, "ppo-verifier", "dpo", key))
    add("SFT on the preferred responses before DPO helps", "seed; Xu et al. 2024, Sec. 4.2",
        f"sft+dpo − dpo, {what}", paired_effect(seeds, "sft+dpo", "dpo", key))
    add("Iterative online DPO beats offline DPO", "seed; Xu et al. 2024 (DPO-Iter)",
        f"dpo-iter − dpo, {what}", paired_effect(seeds, "dpo-iter", "dpo", key))
    for (a, b), trick in zip(zip(ABLATION[1:], ABLATION), ("advantage normalisation", "a large batch",
                                                            "a reference EMA")):
        add(f"PPO with {trick} beats PPO without", "Xu et al. 2024, Table 3 (HH .706 → .716 → .716 → .718)",
            f"ablation {a} − {b}, {what}", paired_effect(seeds, f"ablation/{a}", f"ablation/{b}", key))
    gold = paired_effect(seeds, "ppo-rm", "sft", key)
    proxy = metric_effect(seeds, [(s.seed, s.evals["ppo-rm"]["reward"] - s.evals["sft"]["reward"]) for s in seeds
                                  if _num(s.evals.get("ppo-rm", {}).get("reward"))
                                  and _num(s.evals.get("sft", {}).get("reward"))])
    note = f"; reward-model score {proxy.shown(1.0, '', 2)}" if proxy else ""
    add("PPO on a learned reward model over-optimises it (proxy up, gold down)", "seed; Gao et al. 2023",
        f"ppo-rm − sft, {what} (claim: below 0 while the RM score rises)", gold, sign=-1, note=note)
    if gold and proxy and proxy.value <= 0 and not gold.blocked:  # gold fell without the proxy rising: not that
        rows[-1] = rows[-1][:5] + ("not reproduced (the reward-model score did not rise)",)
    chosen = []
    for s in seeds:
        rows_ = read_metrics(s.folder / "dpo")
        beta = _read_beta(s.folder / "dpo")
        value = last(rows_, "rewards/chosen")
        if value is not None and beta:
            chosen.append((s.seed, value / beta))
    add("DPO moves probability to responses outside the preference data", "Xu et al. 2024, Table 1 / Thm 4.1",
        "dpo: log π(y_w)/π_ref(y_w) of the chosen responses at the end of training (nats; below 0: even the "
        "preferred response lost mass, so the pair's mass went elsewhere)", metric_effect(seeds, chosen),
        sign=-1, scale=1.0, unit=" nats", digits=3)
    # the preference family and the GRPO family, each against what its paper compares it with (same SFT start,
    # same preference pairs or the same verifier and prompts)
    for a, b, claim, source in (
            ("kto", "dpo", "KTO on the same preferences, unpaired, beats DPO",
             "Ethayarajh et al. 2024, Sec. 4 (KTO matches or exceeds DPO at 1B-30B)"),
            ("orpo", "dpo", "ORPO beats DPO", "Hong et al. 2024, Sec. 6 (Mistral-ORPO vs Zephyr, AlpacaEval 2.0)"),
            ("simpo", "dpo", "SimPO beats DPO", "Meng et al. 2024, Table 4 (up to +6.4 points on AlpacaEval 2)"),
            ("grpo", "ppo-verifier", "GRPO without a critic beats PPO with one",
             "Shao et al. 2024, Sec. 4 (the group baseline replaces the critic)"),
            ("dapo", "grpo", "DAPO beats GRPO", "Yu et al. 2025, Fig. 1 (AIME 2024: 50 vs 30)"),
            ("dr_grpo", "grpo", "Dr. GRPO beats GRPO", "Liu et al. 2025, Sec. 3 (no length or difficulty bias)")):
        add(claim, source, f"{a} − {b}, {what}", paired_effect(seeds, a, b, key))
    add("Training the top layers with the new head beats the head alone", "seed (transfer learning, SFT section)",
        "classification on sentiment: top 2 blocks + head − head only, held-out accuracy",
        classify_effect(seeds, "top2", "head"))
    return rows


def _read_beta(run: Path) -> float | None:
    path = run / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return float(cfg["beta"]) if _num(cfg.get("beta")) else None


def claims_table(seeds: list[Seed], key: str, what: str) -> str:
    lines = ["| claim | source | measured as | effect ± SE | seeds | verdict |", "|---|---|---|---:|---:|---|"]
    for claim, source, how, effect, shown, verdict in claims(seeds, key, what):
        n = len(effect.per_seed) if effect else 0
        lines.append(f"| {claim} | {source} | {how} | {shown} | {n} | {verdict} |")
    return "\n".join(lines)


def classification_table(seeds: list[Seed]) -> str:
    """Head only vs top 2 blocks vs all layers vs LoRA: held-out accuracy (mean ± SE over seeds) and training cost."""
    lines = ["| trained | accuracy ± SE | per seed | training time (s) |", "|---|---:|---|---:|"]
    labels = {"head": "head only", "top2": "top 2 blocks + head", "all": "all layers", "lora": "LoRA r=8 + head"}
    for variant in CLASSIFY:
        accs = [(s, classify_accuracy(s.folder, variant)) for s in seeds]
        accs = [(s, a[0]) for s, a in accs if a]
        if not accs:
            continue
        mean, se = mean_and_stderr([a for _, a in accs])
        secs = [s.seconds[f"classify/{variant}"] for s, _ in accs if f"classify/{variant}" in s.seconds]
        cost = f"{sum(secs) / len(secs):.0f}" if secs else ""
        se_shown = f"{100 * se:.1f}" if len(accs) > 1 else "n/a"
        lines.append(f"| {labels[variant]} | {100 * mean:.1f}% ± {se_shown} | "
                     + ", ".join(f"{100 * a:.1f}%" for _, a in accs) + f" | {cost} |")
    return "\n".join(lines) if len(lines) > 2 else ""
