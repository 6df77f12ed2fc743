"""Can the evidence carry a verdict? Named checks for degenerate evaluations and for runs that did nothing.

A difference +- its standard error is only evidence when the numbers behind it vary: 200 copies of one greedy
outcome give a standard error of 0, and a "significant" gain. The checks here say so by name, so a reader (and
the demo's report) withholds the verdict or qualifies it:

- ``zero-variance``: the paired differences to the baseline are the same on every prompt (SE 0 from copies of
  one outcome).
- ``eval-unchanged``: the model's evaluation equals the baseline's on every prompt, or its KL to the baseline is
  under ``KL_UNCHANGED`` nats: the method barely trained.
- ``one-greedy-output``: greedy decoding gives one outcome (the same gold score) for every prompt, so greedy
  numbers cannot rank methods; judge by the sampled measure.
- ``kl-outlier``: a KL to the baseline more than ``KL_OUTLIER`` times the median of the other methods' (and at
  least ``KL_FLOOR`` nats): a gain bought with a drift the others did not make.
- ``eos-collapse``: fewer than ``EOS_MIN`` of the samples end with EOS (the rest run into max_new_tokens), or
  ``EOS_DROP`` fewer than the baseline's.
- ``flat-group-reward``: at least ``FLAT_MIN`` of the prompts' sample groups score the same on every sample: a
  group-relative method gets no signal from them (and the run may have learned nothing).

``BLOCKING`` warnings replace a verdict; the others go beside it. ``training_health`` writes the one-line
summary every training command prints at its end (from its metrics.jsonl and config.yaml).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

KL_UNCHANGED = 0.01  # nats per response
KL_OUTLIER, KL_FLOOR = 4.0, 1.0
EOS_MIN, EOS_DROP = 0.5, 0.25
FLAT_MIN = 0.95
ZERO_SPREAD = 1e-9
BLOCKING = ("zero-variance", "eval-unchanged", "eos-collapse")


@dataclass(frozen=True)
class HealthWarning:
    name: str  # one of the module docstring's names
    text: str  # what was seen, in numbers

    def __str__(self) -> str:
        return f"{self.name}: {self.text}"


def blocking(warnings: list[HealthWarning]) -> list[HealthWarning]:
    return [w for w in warnings if w.name in BLOCKING]


# --------------------------------------------------------------------------- one evaluation


def flat_group_share(groups: list[list[float]]) -> float | None:
    """Share of groups (>= 2 scores each) whose scores are all equal; None without such a group."""
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        return None
    return sum(max(g) - min(g) <= ZERO_SPREAD for g in groups) / len(groups)


def eval_warnings(ev: dict) -> list[HealthWarning]:
    """The checks one eval.json can answer alone: one greedy output, flat sample groups, EOS collapse."""
    out = []
    records = ev.get("samples", [])
    greedy = [float(r["greedy_score"]) for r in records if "greedy_score" in r]
    if len(greedy) >= 2 and max(greedy) - min(greedy) <= ZERO_SPREAD:
        out.append(HealthWarning("one-greedy-output", f"greedy decoding gives one outcome (gold score {greedy[0]:.3g}) "
                                                      f"on all {len(greedy)} prompts: greedy numbers cannot rank "
                                                      "methods; the sampled measure can"))
    share = flat_group_share([r["sample_scores"] for r in records if r.get("sample_scores")])
    if share is not None and share >= FLAT_MIN:
        k = len(next(r["sample_scores"] for r in records if r.get("sample_scores")))
        out.append(HealthWarning("flat-group-reward", f"on {share:.0%} of the prompts all {k} samples score the same: "
                                                      "no spread within a prompt's group"))
    eos = ev.get("eos_rate")
    if isinstance(eos, (int, float)) and eos < EOS_MIN:
        out.append(HealthWarning("eos-collapse", f"only {eos:.0%} of the samples end with EOS; the rest run into "
                                                 "max_new_tokens"))
    return out


# --------------------------------------------------------------------------- a method against the baseline


def paired_warnings(values: list[float], base_values: list[float], *, kl: float | None = None,
                    base_eos: float | None = None, eos: float | None = None) -> list[HealthWarning]:
    """The checks of one method's per-prompt values against the baseline's on the same prompts (and its KL to the
    baseline, its and the baseline's EOS rates when known)."""
    out = []
    if len(values) >= 2 and len(values) == len(base_values):
        diffs = [a - b for a, b in zip(values, base_values)]
        if all(abs(d) <= ZERO_SPREAD for d in diffs):
            out.append(HealthWarning("eval-unchanged", f"the same score as the baseline on all {len(diffs)} prompts"))
        elif max(diffs) - min(diffs) <= ZERO_SPREAD:
            out.append(HealthWarning("zero-variance", f"the paired difference is {diffs[0]:+.3g} on every one of the "
                                                      f"{len(diffs)} prompts: a standard error of 0 from copies of "
                                                      "one outcome"))
    if kl is not None and kl < KL_UNCHANGED and not any(w.name == "eval-unchanged" for w in out):
        out.append(HealthWarning("eval-unchanged", f"KL to the baseline {kl:.3g} nats: the model barely moved"))
    if eos is not None and base_eos is not None and eos >= EOS_MIN and base_eos - eos > EOS_DROP:
        out.append(HealthWarning("eos-collapse", f"EOS rate {eos:.0%} against the baseline's {base_eos:.0%}"))
    return out


def kl_outliers(kls: dict[str, float]) -> dict[str, HealthWarning]:
    """Methods whose KL is far outside the others' (module docstring); needs at least three methods."""
    out = {}
    for name, kl in kls.items():
        others = [v for n, v in kls.items() if n != name]
        if len(others) < 2:
            continue
        typical = statistics.median(others)
        if kl >= KL_FLOOR and kl > KL_OUTLIER * max(typical, KL_FLOOR / KL_OUTLIER):
            out[name] = HealthWarning("kl-outlier", f"KL {kl:.2f} nats, {kl / max(typical, 1e-9):.0f}x the other "
                                                    f"methods' median {typical:.2f}: a drift the others did not make")
    return out


# --------------------------------------------------------------------------- the end of a training run


def _read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def training_health(rows: list[dict], config: dict) -> tuple[str, list[HealthWarning]]:
    """(the health line, its warnings) of a finished run from its metrics.jsonl rows and resolved config.yaml:
    loss (first -> last), KL growth (PPO's objective/kl), EOS rate and the clipped-completion share (samples cut at
    max_new_tokens), the share of prompts whose sample group had zero reward spread, the share of training rows
    truncated to max_length. Only what the run logged."""
    parts, warnings = [], []
    loss = _series(rows, "loss")
    if loss:
        parts.append(f"loss {loss[0]:.4g} -> {loss[-1]:.4g}")
    kl = _series(rows, "objective/kl") or _series(rows, "kl")  # ppo's name, grpo's (TRL's) name
    if kl:
        parts.append(f"KL {kl[0]:.3g} -> {kl[-1]:.3g} nats")
        if max(abs(v) for v in kl) < KL_UNCHANGED and len(kl) >= 2:
            warnings.append(HealthWarning("eval-unchanged", f"the KL to the reference never left 0 (max "
                                                            f"{max(abs(v) for v in kl):.2g} nats): the policy barely moved"))
    rollout = config.get("rollout") if isinstance(config.get("rollout"), dict) else {}
    eos = _series(rows, "rollout/eos_rate")
    if not eos and _series(rows, "val/num_eos_tokens") and rollout.get("batch_size"):
        eos = [v / float(rollout["batch_size"]) for v in _series(rows, "val/num_eos_tokens")]
    if not eos:  # grpo logs TRL's share of completions cut at max_new_tokens
        eos = [1.0 - v for v in _series(rows, "completions/clipped_ratio")]
    if eos:
        parts.append(f"EOS rate {eos[-1]:.0%} (clipped completions {1 - eos[-1]:.0%})")
        if eos[-1] < EOS_MIN:
            warnings.append(HealthWarning("eos-collapse", f"only {eos[-1]:.0%} of the last rollout ended with EOS"))
    flat = _series(rows, "frac_reward_zero_std")
    pairs = _series(rows, "pairs")
    if not flat and pairs and config.get("prompts_per_round"):  # online DPO drops a prompt whose samples tie
        flat = [1 - p / float(config["prompts_per_round"]) for p in pairs]
    if flat:
        share = sum(flat) / len(flat)
        parts.append(f"zero-variance reward groups {share:.0%}")
        if share >= FLAT_MIN:
            warnings.append(HealthWarning("flat-group-reward", f"{share:.0%} of the prompts' sample groups had one "
                                                               "reward for every sample: no learning signal"))
    data = next((r for r in rows if "data/examples" in r), None)
    if data and data.get("data/truncated"):
        parts.append(f"truncated rows {data['data/truncated'] / max(data['data/examples'], 1):.0%}")
    parts.append("warnings: " + ("; ".join(map(str, warnings)) if warnings else "none"))
    return "health: " + "; ".join(parts), warnings


def print_health(run) -> None:
    """Print the health line of the finished run ``run`` (a RunContext): the main rank only."""
    if not run.dist.is_main:
        return
    path = Path(run.output_dir) / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    print(training_health(_read_rows(Path(run.output_dir)), config if isinstance(config, dict) else {})[0], flush=True)
