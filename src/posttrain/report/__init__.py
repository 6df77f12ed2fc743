"""``posttrain report RUN_DIR [RUN_DIR ...]``: markdown + PNG report for one run or a comparison.

Reads each run folder's ``metrics.jsonl`` (training curves) and ``eval.json`` (final numbers,
written by ``posttrain eval``; a run without one gets an empty row). Writes ``report.md``
with a results table (one row per run, one column per eval.json key), overlaid curves of
the metrics the runs share, each run's own curves, the reward-KL frontier when eval.json
has a gold accuracy and a KL, and proxy-vs-gold reward for runs that log both. The run's
folder name is its method name, which fixes its colour in every plot.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from posttrain.config import ConfigError, ReportConfig
from posttrain.errors import DataError
from posttrain.report.plots import method_color, plot_curves, plot_frontier, plot_grid, plot_proxy_vs_gold

# eval.json columns shown first, in this order, when present (the rest follow in file order)
PREFERRED = ("gold", "pass@", "reward", "kl", "length", "eos", "perplexity", "accuracy", "f1", "time", "seconds")
NOT_CURVES = {"step", "epoch"}
PROXY_KEY = "objective/scores"


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


def read_eval(run: Path) -> dict:
    path = Path(run) / "eval.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg}", source=str(path), row=e.lineno) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object of metrics", source=str(path))
    return flatten(data)


def _order(keys: list[str]) -> list[str]:
    def rank(key: str) -> tuple[int, int]:
        hits = [i for i, word in enumerate(PREFERRED) if word in key.lower()]
        return (hits[0] if hits else len(PREFERRED), keys.index(key))

    return sorted(keys, key=rank)


def _cell(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def results_table(names: list[str], evals: list[dict]) -> str:
    """Markdown table: one row per run, one column per eval.json key (union over runs)."""
    keys: list[str] = []
    for ev in evals:
        keys += [k for k in ev if k not in keys]
    keys = _order(keys)
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, ev in zip(names, evals):
        lines.append(f"| {name} | " + " | ".join(_cell(ev.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _first_key(keys, word: str, exact: tuple[str, ...]) -> str | None:
    for key in exact:
        if key in keys:
            return key
    return next((k for k in keys if word in k.lower()), None)


def _numeric_metrics(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and k not in NOT_CURVES
                 and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return keys


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "metric"


def write_report(runs: list[Path], out_dir: Path, title: str = "posttrain report",
                 extra_sections: dict[str, str] | None = None) -> Path:
    """Write ``out_dir/report.md`` and ``out_dir/plots/*.png`` for the given run folders; return the report path."""
    runs = [Path(r) for r in runs]
    missing = [str(r) for r in runs if not r.is_dir()]
    if missing:
        raise ConfigError(f"run folder(s) not found: {', '.join(missing)}")
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    names = [run_name(r) for r in runs]
    metrics = {name: read_metrics(r) for name, r in zip(names, runs)}
    evals = [read_eval(r) for r in runs]

    parts = [f"# {title}", "", "Runs: " + ", ".join(f"`{r}`" for r in runs), ""]
    if any(evals):
        parts += ["## Results", "", results_table(names, evals), ""]

    def embed(png: Path, caption: str) -> None:
        parts.extend([f"![{caption}](plots/{png.name})", ""])

    # the reward-KL frontier: every run whose eval.json has both a gold accuracy and a KL
    points = {}
    for name, ev in zip(names, evals):
        gold = _first_key(ev, "gold", ("gold_accuracy", "gold/accuracy"))
        kl = _first_key(ev, "kl", ("kl", "kl_to_ref", "sequence_kl"))
        if gold and kl and isinstance(ev[gold], (int, float)) and isinstance(ev[kl], (int, float)):
            points[name] = (float(ev[kl]), float(ev[gold]))
    if points:
        parts += ["## Gold accuracy against KL to the SFT model", ""]
        embed(plot_frontier(points, plots / "frontier.png"), "reward-KL frontier")

    per_run = {name: _numeric_metrics(rows) for name, rows in metrics.items()}
    shared = [k for k in dict.fromkeys(k for keys in per_run.values() for k in keys)
              if sum(k in keys for keys in per_run.values()) >= min(2, len(runs))]
    if shared:
        parts += ["## Training curves" + (" (shared metrics)" if len(runs) > 1 else ""), ""]
        for metric in shared:
            embed(plot_curves({n: metrics[n] for n in names if metric in per_run[n]}, metric,
                              plots / f"curve_{_slug(metric)}.png"), metric)
    for name in names:
        own = [k for k in per_run[name] if k not in shared]
        if own:
            parts += [f"## {name}: its own metrics", ""]
            embed(plot_grid(name, metrics[name], own, plots / f"{_slug(name)}_metrics.png"), f"{name} metrics")
        gold = _first_key(per_run[name], "gold", ())
        if PROXY_KEY in per_run[name] and gold:
            parts += [f"## {name}: proxy reward against gold reward", ""]
            embed(plot_proxy_vs_gold(metrics[name], plots / f"{_slug(name)}_proxy_vs_gold.png",
                                     proxy=PROXY_KEY, gold=gold, name=name), f"{name} proxy vs gold")

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


__all__ = ["main", "method_color", "read_eval", "read_metrics", "results_table", "run_name", "write_report"]
