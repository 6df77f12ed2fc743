"""The report of `posttrain demo`: its intro paragraph, the "what this shows" text written from the numbers (each
method against SFT, +- standard error, or "no verdict" with the named warning when the evidence is degenerate), the
claims table (`posttrain.report.evidence`), and the wall time of every stage; the tables and plots are
`write_report`'s. `posttrain.recipes.demo` runs the stages and calls `write_demo_report` for each seed's folder and,
with `--seeds N`, `write_seeds_report` for the verdicts over seeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

from posttrain.config import DemoConfig
from posttrain.eval.health import BLOCKING, blocking
from posttrain.eval.metrics import mean_and_stderr
from posttrain.report import read_metrics, summary_table, write_report
from posttrain.report.evidence import (Effect, Seed, claims_table, classification_table, difference, load_seed,
                                       measure_key, method_warnings, paired_effect)

METHODS = ["sft", "ppo-rm", "ppo-verifier", "dpo", "sft+dpo", "dpo-iter",
           "kto", "orpo", "simpo", "grpo", "dr_grpo", "dapo"]  # the demo's runs, in the report's order (grpo rows: arithmetic)


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


MEASURES = {  # eval.json key -> how the report names it
    "pass@1": "sampled accuracy (pass@1)", "sampled_gold_score": "mean gold score over samples",
    "gold_accuracy": "gold accuracy (greedy)", "gold_score": "mean gold score (greedy)",
}


def _kind(effect: Effect) -> str:
    if effect.blocked:
        return "blocked"
    margin = effect.t * effect.se
    return "better" if effect.value > margin else ("worse" if effect.value < -margin else "noise")


def findings(evals: dict[str, dict], curves: dict[str, list[dict]], task: str) -> str:
    """The "what this shows" text of one seed, written from the numbers: a plain verdict per method against SFT
    (or "no verdict" with the named warning when the evidence is degenerate), the details, then the paper's
    comparisons and over-optimisation of the reward model.

    The measure is eval.json's ``measure`` (a graded task's mean score over samples, else sampled accuracy), or
    greedy gold accuracy for an eval.json without one. A difference is given +- one standard error
    (`difference`); it counts as real beyond two standard errors, anything smaller is called noise."""
    key = measure_key(evals, task)
    what = MEASURES.get(key, key)
    base = evals.get("sft", {})
    if key not in base:
        return "The SFT model has no evaluation, so nothing can be compared."
    n = int(base.get("num_prompts", 1))
    warnings = method_warnings({name: evals.get(name, {}) for name in METHODS}, key)
    seeds = [Seed(0, Path("."), evals, {})]

    def verdict(name: str, ref: str = "sft") -> tuple[str, str] | None:
        a, b = evals.get(name, {}), evals.get(ref, {})
        if key not in a or key not in b:
            return None
        effect = paired_effect(seeds, name, ref, key)
        kind = _kind(effect)
        if kind == "blocked":
            return kind, f"has no verdict against {ref}: " + "; ".join(w.split(": ", 1)[1] for w in effect.blocked)
        word = {"better": "improved on", "noise": "did NOT improve on",
                "worse": "did NOT improve on, and is worse than"}
        tail = " (the difference is within noise)" if kind == "noise" else ""
        return kind, (f"{word[kind]} {ref} ({what} {a[key]:.1%} vs {b[key]:.1%}, {effect.shown()}){tail}")

    groups: dict[str, list[str]] = {"better": [], "noise": [], "worse": [], "blocked": [], "missing": []}
    details = []
    for name in METHODS[1:]:
        v = verdict(name)
        if v is None:
            groups["missing"].append(name)
            details.append(f"- {name}: no evaluation (the stage did not run).")
            continue
        ev = evals[name]
        d, se = difference(ev, base, key)
        names = [w.name for w in warnings.get(name, [])]
        groups[v[0]].append(name + (f" ({', '.join(names)})" if v[0] == "blocked" else
                                    f" ({100 * d:+.1f} ± {100 * se:.1f} points)"))
        said = {w.name for w in warnings.get("sft", [])}  # said once on SFT's line (and per run under Warnings)
        flagged = [w for w in warnings.get(name, []) if w not in blocking(warnings.get(name, [])) and w.name not in said]
        details.append(f"- {name} {v[1]}; KL to SFT {ev.get('kl', float('nan')):.2f} nats, EOS rate "
                       f"{ev.get('eos_rate', float('nan')):.0%}."
                       + "".join(f" **Warning {w.name}:** {w.text}." for w in flagged))
    heads = {"better": "Improved on SFT", "noise": "No measurable change from SFT (within noise)",
             "worse": "Worse than SFT", "blocked": "No verdict (degenerate evidence)", "missing": "Not evaluated"}
    lines = [f"**{heads[g]}:** {', '.join(groups[g]) or 'none'}.  " for g in heads if groups[g] or g == "better"]
    sampled = key in ("pass@1", "sampled_gold_score")
    lines += ["", f"Measure: held-out {what}, on {n} prompts"
                  + (f" x {base.get('num_samples', '?')} samples" if sampled else "")
                  + "; differences in percentage points ± one standard error, paired over the same prompts; a "
                    "method counts as better or worse only beyond two standard errors. One seed: indicative only "
                    "(`--seeds N` judges over seeds).", ""]
    base_warn = "".join(f" **Warning {w.name}:** {w.text}." for w in warnings.get("sft", []))
    lines.append(f"- sft: {what} {base[key]:.1%}.{base_warn}")
    lines += details
    greedy = "gold_accuracy" if "gold_accuracy" in base else None
    if sampled and greedy and not any(w.name == "one-greedy-output" for ws in warnings.values() for w in ws):
        # greedy decoding: the mode of the distribution RL sharpens; shown where it varies across prompts
        out = {"better": [], "noise": [], "worse": [], "blocked": []}
        for name in METHODS[1:]:
            if greedy in evals.get(name, {}):
                e = paired_effect(seeds, name, "sft", greedy)
                out[_kind(e)].append(f"{name} ({e.shown()})")
        lines += ["", f"Greedy gold accuracy (SFT {base[greedy]:.1%}): **above SFT:** {', '.join(out['better']) or 'none'}; "
                      f"**within noise:** {', '.join(out['noise']) or 'none'}; **below SFT:** "
                      f"{', '.join(out['worse']) or 'none'} (points ± SE, paired over prompts).", ""]
    elif not sampled and "pass@1" in base:
        out = {"better": [], "noise": [], "worse": [], "blocked": []}
        for name in METHODS[1:]:
            if "pass@1" in evals.get(name, {}):
                e = paired_effect(seeds, name, "sft", "pass@1")
                out[_kind(e)].append(f"{name} ({e.shown(unit='')})")
        lines += ["", f"Sampled accuracy (pass@1 at the training temperature, {base.get('num_samples', 4)} samples per "
                      f"prompt; SFT {base['pass@1']:.1%}) — the distribution RL optimises: "
                      f"**above SFT:** {', '.join(out['better']) or 'none'}; "
                      f"**within noise:** {', '.join(out['noise']) or 'none'}; "
                      f"**below SFT:** {', '.join(out['worse']) or 'none'} (points ± SE, paired over prompts).", ""]
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
    measure = MEASURES.get(measure_key(evals, cfg.task), "the gold measure")
    return (f"The demo post-trained {model} Llama model (built locally by `posttrain tiny-model`) on {task}: SFT on "
            f"{_rows(out / 'task' / 'sft.jsonl'):,} demonstrations, {what}. Every model was scored on the same {n} "
            f"held-out prompts ({k} samples each at T = 1): {measure} with its standard error, greedy decoding "
            f"where it varies across prompts, the reward model's score and the KL to the SFT model. The whole run took {sum(seconds.values()):,.0f} s; the table's wall time is "
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
    sections = {}
    if not cfg.ablation:
        seed = [load_seed(cfg.seed, out, METHODS)]
        key = measure_key(evals, cfg.task)
        sections[CLAIMS_HEADING] = (claims_table(seed, key, MEASURES.get(key, key)) + "\n\n" + CLAIMS_NOTE
                                    + " One seed: every verdict is indicative only; `posttrain demo --seeds 3` "
                                      "judges them over seeds.")
        table = classification_table(seed)
        if table:
            sections["SFT for classification: which layers to train"] = table + "\n\n" + CLASSIFY_NOTE
    sections["Wall time per stage"] = stage_table(seconds)
    return write_report([out / r for r in runs], report_dir, title=title, intro=intro(cfg, out, evals, seconds),
                        findings=None if cfg.ablation else findings(evals, curves, cfg.task), wall_times=wall,
                        curve_runs=extra, extra_sections=sections)


CLAIMS_HEADING = "Claims of the background paper and of Xu et al. 2024, judged"
CLAIMS_NOTE = ("Effect: a paired difference over the same held-out prompts per seed; over seeds, mean ± SE of the "
               "per-seed differences, judged against the two-sided 95% Student-t value for the number of seeds "
               "(`posttrain.report.evidence`). The PPO-trick rows need `posttrain demo --ablation` in the same "
               "folder; \"not run\" otherwise.")
CLASSIFY_NOTE = ("A new, randomly initialised classification head on the tiny backbone, trained on the sentiment "
                 "task's labelled reviews (`examples/demo/classify.yaml`); accuracy on the 10% hold-out, training "
                 "time is the stage's wall time.")


def seeds_findings(seeds: list[Seed], key: str) -> str:
    """Each method against SFT over seeds (`posttrain.report.evidence`), with every seed's named warnings."""
    what = MEASURES.get(key, key)
    n = len(seeds)
    groups: dict[str, list[str]] = {"better": [], "noise": [], "worse": [], "blocked": []}
    details = []
    for name in METHODS[1:]:
        effect = paired_effect(seeds, name, "sft", key)
        if effect is None:
            continue
        kind = _kind(effect)
        groups[kind].append(f"{name} ({effect.shown()})" if kind != "blocked" else name)
        seen: dict[str, list[int]] = {}  # warning name -> the seeds that show it
        for s in seeds:
            for w in method_warnings({m: s.evals.get(m, {}) for m in METHODS}, key).get(name, []):
                seen.setdefault(w.name, []).append(s.seed)
        shown = lambda ws: ", ".join(f"{w} (seeds {', '.join(map(str, ss))})" for w, ss in ws)  # noqa: E731
        stopped = [(w, ss) for w, ss in seen.items() if w in BLOCKING]
        flagged = [(w, ss) for w, ss in seen.items() if w not in BLOCKING]
        per_seed = ", ".join(f"{100 * v:+.1f}" for v in effect.per_seed)
        details.append(f"- {name}: {effect.shown()} over {len(effect.per_seed)} seeds (per seed: {per_seed}; "
                       f"t = {effect.t:.2f})" + (f": **no verdict**, {shown(stopped)}" if effect.blocked else "")
                       + "." + (f" **Warnings:** {shown(flagged)}." if flagged else ""))
    heads = {"better": "Improved on SFT", "noise": "No measurable change from SFT (within noise)",
             "worse": "Worse than SFT", "blocked": "No verdict (degenerate evidence)"}
    lines = [f"**{heads[g]}:** {', '.join(groups[g]) or 'none'}.  " for g in heads if groups[g] or g == "better"]
    lines += ["", f"Measure: held-out {what}; each seed's difference to SFT is paired over the same prompts, and the "
                  f"verdict comes from the spread of the {n} per-seed differences (mean ± SE over seeds, a change "
                  f"counts beyond t × SE with the two-sided 95% Student-t value for {n - 1} degrees of freedom).", "",
              *details]
    return "\n".join(lines)


def seeds_table(seeds: list[Seed], key: str) -> str:
    """Per method: the measure (mean ± SE over seeds), each seed's value, greedy accuracy, KL and EOS rate means."""
    lines = [f"| method | {MEASURES.get(key, key)} ± SE over seeds | per seed | greedy gold acc. | KL to SFT (nats) "
             "| EOS rate |", "|---|---:|---|---:|---:|---:|"]
    for name in METHODS:
        evs = [s.evals[name] for s in seeds if key in s.evals.get(name, {})]
        if not evs:
            continue
        mean, se = mean_and_stderr([ev[key] for ev in evs])

        def avg(k, fmt):
            vals = [ev[k] for ev in evs if isinstance(ev.get(k), (int, float))]
            return fmt(sum(vals) / len(vals)) if vals else ""
        lines.append(f"| {name} | {100 * mean:.1f}% ± {100 * se:.1f} | " + ", ".join(f"{100 * ev[key]:.1f}%" for ev in evs)
                     + f" | {avg('gold_accuracy', lambda v: f'{100 * v:.1f}%')} | {avg('kl', lambda v: f'{v:.2f}')} | "
                     f"{avg('eos_rate', lambda v: f'{100 * v:.0f}%')} |")
    return "\n".join(lines)


def write_seeds_report(cfg: DemoConfig, out: Path, folders: dict[int, Path]) -> Path:
    """`out/report.md` of `posttrain demo --seeds N`: verdicts over seeds, the claims table, the classification
    table, every seed's results table (in <details>), wall times; each seed's own report (plots) stays in its folder.
    With --ablation: the Table 3 rows over seeds."""
    seeds = [load_seed(s, folder, METHODS) for s, folder in folders.items()]
    key = measure_key(seeds[0].evals, cfg.task)
    what = MEASURES.get(key, key)
    title = f"posttrain demo: {cfg.task}, {len(seeds)} seeds" + (" (--quick)" if cfg.quick else "")
    total = sum(sum(s.seconds.values()) for s in seeds)
    parts = [f"# {title}", "",
             f"Every stage of the demo ran once per seed ({', '.join(str(s.seed) for s in seeds)}; seed S is "
             f"`posttrain demo seed=S output_dir={_rel(out)}/seed-S`, whose own report with plots is "
             f"`seed-S/report.md`). {total:,.0f} s of stages in all." + (" `--quick`: tiny step counts, so the "
                                                                          "numbers are noise." if cfg.quick else ""),
             ""]
    if not cfg.ablation:
        parts += ["## What this shows", "", seeds_findings(seeds, key), "",
                  "## Results over seeds", "", seeds_table(seeds, key), ""]
    parts += [f"## {CLAIMS_HEADING}", "", claims_table(seeds, key, what), "", CLAIMS_NOTE, ""]
    table = classification_table(seeds)
    if table:
        parts += ["## SFT for classification: which layers to train", "", table, "", CLASSIFY_NOTE, ""]
    parts += ["<details><summary>Each seed's results</summary>", ""]
    for s in seeds:
        names = [m for m in METHODS + [f"ablation/{a}" for a in ("1_baseline", "2_adv_norm", "3_large_batch",
                                                                    "4_ref_ema")] if m in s.evals]
        parts += [f"### seed {s.seed}", "", summary_table(names, [s.evals[m] for m in names], {}), ""]
    parts += ["</details>", "", "## Wall time per seed", "", "| seed | stages (s) |", "|---|---:|"]
    parts += [f"| {s.seed} | {sum(s.seconds.values()):,.0f} |" for s in seeds]
    path = out / ("ablation-report.md" if cfg.ablation else "report.md")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
