"""``posttrain report RUN_DIR [RUN_DIR ...]``: markdown + PNG report for one run or a comparison.

Reads each run folder's ``metrics.jsonl`` (training curves) and ``eval.json`` (final numbers, written by
``posttrain eval``; a run without one gets an empty row). ``report.md`` is laid out for a reader who looks
before reading:

1. the title, an intro paragraph (the caller's, else the list of runs), and the caller's findings;
2. a compact results table (gold accuracy, pass@1 +- standard error, pass@k, reward-model score, KL, length,
   EOS rate, wall time; see ``COLUMNS``), with every eval.json field in a collapsed ``<details>`` table;
3. plots, each with a one-line caption: (a) gold accuracy against KL for every run (the reward-KL frontier),
   (b) held-out gold accuracy during training, (c) proxy reward against gold for runs whose reward is not the
   gold one (over-optimisation), (d) training curves as small multiples, one figure per method family
   (``FIGURES``), so that losses of different algorithms never share an axis. A run's family comes from
   the metric names it logs (``run_kind``); row counts (``data/*``), learning rate, episode counts and timings
   are not plotted, the family's other curves go in a collapsed block.

The run's folder name is its method name, which fixes its colour in every plot.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from posttrain.config import ConfigError, ReportConfig
from posttrain.errors import DataError
from posttrain.eval.metrics import mean_and_stderr
from posttrain.report.plots import (
    method_color,
    plot_frontier,
    plot_gold_over_training,
    plot_panels,
    plot_proxy_vs_gold,
    series,
)

PROXY_KEY = "objective/scores"
GOLD_KEYS = ("objective/gold", "eval/gold_accuracy")  # gold of the training samples, then held-out greedy
TRAINING_GOLD = {"greedy": ("eval/gold_accuracy", "eval_gold_reward"), "sampled": ("eval/sampled_accuracy",)}
NOT_CURVES = {"step", "epoch", "round", "episodes", "learning_rate", "tokens_per_second"}
NOT_CURVE_PREFIXES = ("data/", "normalize/")
# kind -> (label, the curves worth a look, in panel order)
KINDS = {
    "sft": ("SFT", ("loss", "eval_loss")),
    "rm": ("reward model", ("loss", "eval_loss", "accuracy", "eval_accuracy")),
    "dpo": ("DPO", ("loss", "rewards/accuracies", "rewards/margins", "eval_loss")),
    "ppo": ("PPO", ("objective/scores", "objective/kl", "objective/entropy", "policy/clipfrac_avg", "loss/value_avg")),
}
# one small-multiples figure per family: (file stem, title, kinds)
FIGURES = [("sft_rm", "SFT and reward model", ("sft", "rm")), ("dpo", "DPO family", ("dpo",)),
           ("ppo", "PPO family", ("ppo",)), ("other", "other runs", ("other",))]
CAPTIONS = {  # kind -> what to look for in its curves
    "sft": "SFT: the token cross-entropy should fall and flatten.",
    "rm": "Reward model: the pairwise loss falls and the accuracy on held-out pairs rises.",
    "dpo": "DPO: the loss starts at log 2 = 0.69; rewards/accuracies should rise towards 1 and rewards/margins grow.",
    "ppo": "PPO: objective/scores (each run's own reward) should rise while objective/kl stays small and the "
           "entropy does not collapse.",
    "other": "Curves of runs whose method is not recognised from their metric names.",
}


def run_name(run: Path) -> str:
    """The method name of a run: its folder name (the parent's when the folder is ``final``)."""
    run = Path(run).resolve()
    return run.parent.name if run.name == "final" else run.name


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"not valid JSON: {e.msg}", source=str(path), row=i) from None
    return rows


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; lists are left out (per-sample details, not table cells)."""
    flat: dict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


def load_eval(run: Path) -> dict:
    """A run's ``eval.json`` as written (with its per-prompt ``samples``); {} when there is none."""
    path = Path(run) / "eval.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg}", source=str(path), row=e.lineno) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object of metrics", source=str(path))
    return data


def read_eval(run: Path) -> dict:
    """The numbers of a run's ``eval.json``, nested keys flattened, per-prompt lists left out."""
    return flatten(load_eval(run))


# --------------------------------------------------------------------------- numbers


def gold_key(ev: dict) -> str | None:
    """The headline gold measure: a graded task's mean score over samples (eval.json's ``measure``), else greedy
    accuracy (tasks with a right answer), else the mean gold score."""
    if ev.get("measure") == "sampled_gold_score" and _is_number(ev.get("sampled_gold_score")):
        return "sampled_gold_score"
    return next((k for k in ("gold_accuracy", "gold_score") if isinstance(ev.get(k), (int, float))), None)


def per_prompt(ev: dict, key: str) -> list[float]:
    """Per-prompt values of ``key`` from eval.json's ``samples``: ``gold_accuracy`` 0/1 (greedy score >= 1),
    ``gold_score`` the greedy score, ``pass@1`` the fraction of the prompt's samples that are correct,
    ``sampled_gold_score`` the mean score of the prompt's samples. [] when eval.json has no per-prompt records."""
    out = []
    for rec in ev.get("samples", []):
        if key == "sampled_gold_score" and rec.get("sample_scores"):
            out.append(sum(rec["sample_scores"]) / len(rec["sample_scores"]))
        elif key in ("gold_accuracy", "gold_score") and "greedy_score" in rec:
            score = float(rec["greedy_score"])
            out.append(float(score >= 1.0) if key == "gold_accuracy" else score)
        elif key == "pass@1" and rec.get("sample_scores"):
            out.append(sum(s >= 1.0 for s in rec["sample_scores"]) / len(rec["sample_scores"]))
    return out


def stderr(ev: dict, key: str) -> float:
    """Standard error over prompts of ``ev[key]``: from the per-prompt values when eval.json has them, else the
    binomial bound sqrt(p (1-p) / n) over ``num_prompts`` (p (1-p) bounds the variance of any [0, 1] score)."""
    values = per_prompt(ev, key)
    if len(values) > 1:
        return mean_and_stderr(values)[1]
    p, n = float(ev[key]), int(ev.get("num_prompts") or 1)
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _seconds(s: float) -> str:
    return f"{s:,.0f} s"


def _pass_at_max(ev: dict) -> str | None:
    ks = [int(k[len("pass@"):]) for k in ev if re.fullmatch(r"pass@\d+", k)]
    return f"pass@{max(ks)}" if ks and max(ks) > 1 else None


def _cell_of(key, fmt):
    """A column's cell maker: ``ev[key]`` written by ``fmt(value, ev)``, None when the run has no such number."""
    def cell(ev: dict) -> str | None:
        k = key(ev) if callable(key) else key
        return fmt(ev[k], ev) if k and _is_number(ev.get(k)) else None
    return cell


def _informative_greedy(key: str):
    """``key`` unless greedy decoding gave one outcome for every prompt (then greedy numbers rank nothing)."""
    def pick(ev: dict) -> str | None:
        scores = {r["greedy_score"] for r in ev.get("samples", []) if "greedy_score" in r}
        return None if len(scores) == 1 and len(ev.get("samples", [])) > 1 else key
    return pick


# compact table columns (header, cell maker); a column shows when any run has its number
COLUMNS = [
    ("gold score (sampled) ± SE", _cell_of(lambda ev: "sampled_gold_score" if gold_key(ev) == "sampled_gold_score"
                                           else None,
                                           lambda v, ev: f"{v:.3f} ± {stderr(ev, 'sampled_gold_score'):.3f}")),
    ("gold acc. (greedy)", _cell_of(_informative_greedy("gold_accuracy"), lambda v, ev: _pct(v))),
    ("gold score (greedy)", _cell_of(lambda ev: None if "gold_accuracy" in ev else _informative_greedy("gold_score")(ev),
                                     lambda v, ev: f"{v:.3f}")),
    ("pass@1 (sampled) ± SE", _cell_of("pass@1", lambda v, ev: f"{_pct(v)} ± {100 * stderr(ev, 'pass@1'):.1f}")),
    ("pass@k", _cell_of(_pass_at_max, lambda v, ev: _pct(v))),
    ("RM score", _cell_of("reward", lambda v, ev: f"{v:.3f}")),
    ("KL to SFT (nats)", _cell_of("kl", lambda v, ev: f"{v:.2f}")),
    ("mean length (tokens)", _cell_of("length", lambda v, ev: f"{v:.1f}")),
    ("EOS rate", _cell_of("eos_rate", lambda v, ev: _pct(v))),
    ("perplexity", _cell_of("perplexity", lambda v, ev: f"{v:.2f}")),
    ("accuracy", _cell_of("accuracy", lambda v, ev: _pct(v))),
    ("macro-F1", _cell_of("macro_f1", lambda v, ev: f"{v:.3f}")),
    ("wall time", _cell_of("wall_time", lambda v, ev: _seconds(v))),
]


def summary_table(names: list[str], evals: list[dict], wall_times: dict[str, float]) -> str:
    """The compact results table: one row per run, the ``COLUMNS`` any run has, numbers formatted. ``evals`` are
    eval.json as written (per-prompt ``samples`` give the standard errors); ``wall_times`` are seconds by name."""
    evals = [{**ev, **({"wall_time": wall_times[n]} if n in wall_times else {})} for n, ev in zip(names, evals)]
    rows = [[cell(ev) for _, cell in COLUMNS] for ev in evals]
    keep = [j for j in range(len(COLUMNS)) if any(row[j] is not None for row in rows)]
    ks = {_pass_at_max(ev) for ev in evals} - {None}
    headers = [COLUMNS[j][0] for j in keep]
    headers = [h.replace("pass@k", ks.pop() if len(ks) == 1 else "pass@k (largest k)") if h == "pass@k" else h
               for h in headers]
    if "sft" not in names:
        headers = [h.replace("KL to SFT", "KL to ref.") for h in headers]
    lines = ["| method | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(keep)]
    for name, row in zip(names, rows):
        lines.append(f"| {name} | " + " | ".join(row[j] or "" for j in keep) + " |")
    return "\n".join(lines)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def results_table(names: list[str], evals: list[dict]) -> str:
    """Markdown table of every eval.json field: one row per run, one column per key (union over runs)."""
    keys: list[str] = []
    for ev in evals:
        keys += [k for k in ev if k not in keys]
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, ev in zip(names, evals):
        lines.append(f"| {name} | " + " | ".join(_cell(ev.get(k)) for k in keys) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- curves


def curve_metrics(rows: list[dict]) -> list[str]:
    """The numeric metrics of a run worth a curve: no counters, row counts, learning rate or timings."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and k not in NOT_CURVES and _is_number(v)
                 and not k.startswith(NOT_CURVE_PREFIXES) and not k.endswith("seconds")]
    return keys


def run_kind(metrics: list[str]) -> str:
    """The method family of a run, from the metric names it logs (TRL's names, DESIGN.md)."""
    if "objective/kl" in metrics or PROXY_KEY in metrics:
        return "ppo"
    if "rewards/margins" in metrics or "logps/chosen" in metrics or "pairs" in metrics:  # pairs: online DPO
        return "dpo"
    if "accuracy" in metrics or "eval_accuracy" in metrics:
        return "rm"
    return "sft" if "loss" in metrics else "other"


def family_panels(kinds: tuple[str, ...], runs: dict[str, list[dict]], keys: dict[str, list[str]],
                  kind_of: dict[str, str], main: bool) -> list[tuple[str, str, dict[str, list[dict]]]]:
    """Panels (title, metric, runs) of one family figure: the kind's main curves (``main``) or its others with
    at least two points. Each panel holds runs of one kind only, so different losses never share an axis."""
    present = [k for k in kinds if any(kind_of[n] == k for n in runs)]
    panels = []
    for kind in present:
        members = [n for n in runs if kind_of[n] == kind]
        union = list(dict.fromkeys(m for n in members for m in keys[n]))
        wanted = KINDS[kind][1] if kind in KINDS else union
        skip = {m for ms in TRAINING_GOLD.values() for m in ms}
        metrics = [m for m in wanted if m in union] if main else [m for m in union if m not in wanted and m not in skip]
        for metric in metrics:
            with_it = {n: runs[n] for n in members if metric in keys[n]}
            if not main and max(sum(metric in r for r in rows) for rows in with_it.values()) < 2:
                continue
            label = KINDS.get(kind, (kind,))[0]
            panels.append((f"{label}: {metric}" if len(present) > 1 else metric, metric, with_it))
    return panels


def training_gold(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Held-out gold accuracy logged during training, per decoding: {"greedy": [(step, value)], ...}."""
    out = {}
    for decoding, keys in TRAINING_GOLD.items():
        for key in keys:
            xs, ys = series(rows, key)
            if len(xs) >= 2:
                out[decoding] = list(zip(xs, ys))
                break
    return out


def read_reward_config(run: Path) -> dict:
    """The ``reward`` section of a run's ``config.yaml`` (written by every training command); {} without one."""
    path = Path(run) / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except yaml.YAMLError as e:
        raise DataError(f"not valid YAML: {e}", source=str(path)) from None
    reward = cfg.get("reward") if isinstance(cfg, dict) else None
    return reward if isinstance(reward, dict) else {}


def proxy_is_not_gold(rows: list[dict], reward: dict) -> bool:
    """A PPO run trained on a reward other than the gold one: it logs ``objective/scores`` and a gold curve, and
    its config's reward is a model or a function (not the task's verifier). Without a config: its scores are not
    the gold verdicts of the same samples (a verifier's are, up to the EOS penalty)."""
    if sum(PROXY_KEY in r for r in rows) < 2 or not any(k in r for r in rows for k in GOLD_KEYS):
        return False
    if reward:
        return bool(reward.get("model") or reward.get("function"))
    pairs = [(r[PROXY_KEY], r[GOLD_KEYS[0]]) for r in rows if PROXY_KEY in r and GOLD_KEYS[0] in r]
    return not pairs or sum(abs(p - g) for p, g in pairs) / len(pairs) >= 0.05


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "metric"


# --------------------------------------------------------------------------- the report


def _stage_seconds(runs: list[Path]) -> dict[str, float]:
    """Wall time per run from a ``demo.json`` beside the run folders (written by ``posttrain demo``), if any."""
    out: dict[str, float] = {}
    for run in runs:
        stamp = run.resolve().parent / "demo.json"
        if stamp.is_file():
            seconds = json.loads(stamp.read_text(encoding="utf-8")).get("seconds", {})
            if _is_number(seconds.get(run_name(run))):
                out[run_name(run)] = float(seconds[run_name(run)])
    return out


def plot_sections(names: list[str], evals: list[dict], metrics: dict[str, list[dict]], rewards: dict[str, dict],
                  plots: Path) -> list[str]:
    """The markdown of the plots, (a) to (d) of the module docstring, each with a one-line caption. ``rewards``:
    each run's reward config (``read_reward_config``)."""
    parts: list[str] = []

    def embed(heading: str, png: Path, caption: str) -> None:
        parts.extend([f"### {heading}", "", f"![{heading}](plots/{png.name})", "", f"*{caption}*", ""])

    kl_label = "KL to the SFT model" if "sft" in names else "KL to the reference model"
    points = {n: (float(ev["kl"]), float(ev[gold_key(ev)]), stderr(ev, gold_key(ev)))
              for n, ev in zip(names, evals) if gold_key(ev) and _is_number(ev.get("kl"))}
    if points:
        what = "gold accuracy" if all(gold_key(ev) == "gold_accuracy" for ev in evals if ev) else "gold score"
        decoding = "sampled" if all(gold_key(ev) == "sampled_gold_score" for ev in evals if ev) else "greedy"
        embed("Gold accuracy against KL (the reward-KL frontier)",
              plot_frontier(points, plots / "frontier.png", kl_label=f"{kl_label} (nats per response)",
                            gold_label=f"{what}, {decoding} (held-out prompts)"),
              f"Each method's final {what} (bars: ±1 standard error) against how far it moved from "
              + ("SFT; a method above the dashed SFT line gained accuracy, " if "sft" in points else "the reference; ")
              + "and further left means it paid less KL for it.")

    during = {n: training_gold(metrics[n]) for n in names}
    during = {n: d for n, d in during.items() if d}
    if during:
        embed("Held-out gold accuracy during training",
              plot_gold_over_training(during, plots / "gold_during_training.png"),
              "Greedy (and, for PPO, sampled) accuracy on held-out prompts as training goes; the first point is the "
              "starting (SFT) model, so a line that ends below its start lost accuracy.")

    for name in names:
        rows = metrics[name]
        if proxy_is_not_gold(rows, rewards[name]):
            embed(f"{name}: proxy reward against gold",
                  plot_proxy_vs_gold(rows, plots / f"{_slug(name)}_proxy_vs_gold.png", proxy=PROXY_KEY,
                                     gold=GOLD_KEYS, name=name),
                  "The reward model's score (colour, left axis) against the gold verdict (black, right axis): a proxy "
                  "that keeps rising while gold falls is over-optimisation of the reward model.")

    keys = {n: curve_metrics(metrics[n]) for n in names}
    kind_of = {n: run_kind(keys[n]) for n in names}
    more: list[str] = []
    for stem, title, kinds in FIGURES:
        panels = family_panels(kinds, metrics, keys, kind_of, main=True)
        if panels:
            caption = " ".join(CAPTIONS[k] for k in kinds if k in kind_of.values())
            embed(f"Training curves: {title}", plot_panels(panels, plots / f"curves_{stem}.png", title=title), caption)
        others = family_panels(kinds, metrics, keys, kind_of, main=False)
        if others:
            png = plot_panels(others, plots / f"more_{stem}.png", title=f"{title}: other curves")
            more += [f"![{title}: other curves](plots/{png.name})", ""]
    if more:
        parts += ["<details><summary>Other training curves</summary>", "", *more, "</details>", ""]
    return parts


def write_report(runs: list[Path], out_dir: Path, title: str = "posttrain report", *, intro: str | None = None,
                 findings: str | None = None, wall_times: dict[str, float] | None = None,
                 curve_runs: list[Path] = (), extra_sections: dict[str, str] | None = None) -> Path:
    """Write ``out_dir/report.md`` and ``out_dir/plots/*.png`` for the given run folders; return the report path.

    ``intro`` and ``findings`` (markdown) go right under the title; ``wall_times`` (seconds by run name; default:
    a ``demo.json`` beside the runs) fills the wall-time column; ``curve_runs`` are runs shown only in the
    training curves (the demo's reward model); ``extra_sections`` (heading -> markdown) go at the end. PNGs of an
    earlier report in ``out_dir/plots`` that this one does not embed are removed."""
    runs, curve_runs = [Path(r) for r in runs], [Path(r) for r in curve_runs]
    missing = [str(r) for r in runs + curve_runs if not r.is_dir()]
    if missing:
        raise ConfigError(f"run folder(s) not found: {', '.join(missing)}")
    out_dir = Path(out_dir)
    names = [run_name(r) for r in runs]
    evals = [load_eval(r) for r in runs]
    metrics = {run_name(r): read_metrics(r) for r in curve_runs + runs}
    curve_names = [run_name(r) for r in curve_runs] + names

    parts = [f"# {title}", "", intro.rstrip() if intro else "Runs: " + ", ".join(f"`{r}`" for r in runs), ""]
    if findings:
        parts += ["## What this shows", "", findings.rstrip(), ""]
    warned = [f"- {name}: **{w.split(':', 1)[0]}**:{w.split(':', 1)[1]}" for name, ev in zip(names, evals)
              for w in ev.get("warnings", [])]
    if warned:  # what `posttrain eval` found degenerate in each run's own evaluation
        parts += ["## Warnings", "", *warned, ""]
    if any(evals):
        flat = [flatten(ev) for ev in evals]
        parts += ["## Results", "", summary_table(names, evals, wall_times if wall_times is not None
                                                  else _stage_seconds(runs)), "",
                  "<details><summary>All evaluation fields (eval.json)</summary>", "", results_table(names, flat), "",
                  "</details>", ""]
    before = set((out_dir / "plots").glob("*.png"))
    rewards = {run_name(r): read_reward_config(r) for r in curve_runs + runs}
    plots = plot_sections(curve_names, [{}] * len(curve_runs) + evals, metrics, rewards, out_dir / "plots")
    for stale in before - {out_dir / rel for rel in re.findall(r"\]\((plots/[^)]+\.png)\)", "\n".join(plots))}:
        stale.unlink()  # a plot of an earlier report that this one no longer has
    if plots:
        parts += ["## Plots", "", *plots]
    for heading, body in (extra_sections or {}).items():
        parts += [f"## {heading}", "", body.rstrip(), ""]

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


def main(cfg: ReportConfig) -> Path:
    if not cfg.runs:
        raise ConfigError("posttrain report needs at least one run folder: posttrain report RUN_DIR [RUN_DIR ...]")
    out = Path(cfg.output) if cfg.output else (Path(cfg.runs[0]) if len(cfg.runs) == 1 else Path("runs/report"))
    path = write_report([Path(r) for r in cfg.runs], out, cfg.title)
    print(f"report: {path}")
    return path


__all__ = ["main", "method_color", "per_prompt", "read_eval", "read_metrics", "results_table", "run_name",
           "summary_table", "write_report"]
