"""PNG plots for reports (matplotlib, Agg backend: no display needed).

One colour per method name in every plot: the demo's methods have fixed colours, any other
name gets one from a stable hash (crc32, not Python's salted ``hash``). Figures are sized for a
markdown viewer about 900 px wide: single plots 7 x 4.2 inches, small-multiple panels 3.6 x 2.6
inches, all saved at 110 dpi.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import PercentFormatter  # noqa: E402

METHOD_COLORS = {
    "sft": "#4c4c4c",
    "rm": "#8c564b",
    "ppo-rm": "#ff7f0e",
    "ppo-verifier": "#d62728",
    "dpo": "#1f77b4",
    "sft+dpo": "#17becf",
    "dpo-iter": "#2ca02c",
}
FALLBACK_COLORS = ["#9467bd", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#f7b6d2"]
DPI = 110
SINGLE = (7.0, 4.2)  # inches: one plot
PANEL = (3.6, 2.6)  # inches: one panel of a small-multiples grid


def method_color(name: str) -> str:
    """The colour of a method in every plot (``ppo_rm`` and ``PPO-RM`` are the same method)."""
    key = name.strip().lower().replace("_", "-")
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return FALLBACK_COLORS[zlib.crc32(key.encode()) % len(FALLBACK_COLORS)]


def series(rows: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over metric rows, sorted by step; rows without it are skipped, x = ``step``
    or the row number. A step logged twice (online DPO repeats a round's last DPO step) keeps its last value."""
    by_step: dict[float, float] = {}
    for i, row in enumerate(rows):
        value = row.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[float(row.get("step", i))] = float(value)
    xs = sorted(by_step)
    return xs, [by_step[x] for x in xs]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _line(ax, xs, ys, name: str, **kw) -> None:
    ax.plot(xs, ys, color=method_color(name), label=name, linewidth=1.8, marker="o" if len(xs) < 12 else None,
            markersize=4, **kw)


def plot_curves(runs: dict[str, list[dict]], metric: str, path: str | Path) -> Path:
    """One line per run of ``metric`` against the optimizer step, saved as a PNG."""
    return _save(curves_figure(runs, metric), path)


def curves_figure(runs: dict[str, list[dict]], metric: str):
    """The figure of :func:`plot_curves` (the caller saves or closes it)."""
    fig, ax = plt.subplots(figsize=SINGLE, layout="constrained")
    for name, rows in runs.items():
        xs, ys = series(rows, metric)
        if xs:
            _line(ax, xs, ys, name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def plot_frontier(points: dict[str, tuple[float, float, float]], path: str | Path, *, baseline: str = "sft",
                  kl_label: str = "KL to the SFT model (nats per response)",
                  gold_label: str = "gold accuracy, greedy (held-out prompts)") -> Path:
    """Gold accuracy against KL to the SFT model, one point per method with a +-1 standard error bar: the
    reward-KL frontier (Rafailov et al. 2023, Fig. 2). ``points``: name -> (kl, gold, stderr). Up and to the
    left is better; the dashed line is ``baseline``'s accuracy when it is among the points."""
    fig, ax = plt.subplots(figsize=SINGLE, layout="constrained")
    for name, (kl, gold, se) in points.items():
        ax.errorbar([kl], [gold], yerr=[se], fmt="o", markersize=8, color=method_color(name), ecolor=method_color(name),
                    elinewidth=1.5, capsize=4, markeredgecolor="black", markeredgewidth=0.6, zorder=3, label=name)
    if baseline in points:
        ax.axhline(points[baseline][1], color=method_color(baseline), linestyle="--", linewidth=1, alpha=0.7,
                   label=f"{baseline} level")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel(kl_label)
    ax.set_ylabel(gold_label)
    ax.set_title("reward-KL frontier: accuracy bought per nat of KL (up and left is better)")
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)  # no label can hide a point
    return _save(fig, path)


def plot_gold_over_training(runs: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path) -> Path:
    """Held-out gold accuracy during training, one line per run, one panel per decoding (``greedy``,
    ``sampled``). ``runs``: name -> panel -> [(step, value)]. Methods count steps differently (PPO
    iterations, DPO optimizer steps), so x is the fraction of the run's last logged step."""
    panels = [p for p in ("greedy", "sampled") if any(p in r for r in runs.values())]
    fig, axes = plt.subplots(1, len(panels), figsize=(SINGLE[0] * (0.72 if len(panels) > 1 else 1) * len(panels),
                                                      SINGLE[1]), squeeze=False, sharey=True, layout="constrained")
    for ax, panel in zip(axes.flat, panels):
        for name, by_panel in runs.items():
            points = by_panel.get(panel, [])
            if points:
                last = max(x for x, _ in points) or 1.0
                _line(ax, [x / last for x, _ in points], [y for _, y in points], name)
        ax.set_title(f"{panel} decoding")
        ax.set_xlabel("training progress (fraction of the run)")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("gold accuracy (held-out prompts)")
    _legend_below(fig, axes.flat)
    return _save(fig, path)


def plot_proxy_vs_gold(rows: list[dict], path: str | Path, *, proxy: str = "objective/scores",
                       gold: tuple[str, ...] = ("objective/gold", "eval/gold_accuracy"), name: str = "ppo-rm") -> Path:
    """Proxy reward (the reward model's score on the training samples) and gold reward over training, on twin
    y-axes: when the proxy keeps rising while gold falls, the policy over-optimises the reward model (Gao et al.
    2023, "Scaling laws for reward model overoptimization"). Gold lines are black: solid for the first of
    ``gold`` the rows have (the same training samples), dashed with markers for the others (held-out)."""
    fig, ax = plt.subplots(figsize=SINGLE, layout="constrained")
    xs, ys = series(rows, proxy)
    ax.plot(xs, ys, color=method_color(name), linewidth=2.0, label=f"proxy: reward-model score ({proxy})")
    ax.set_xlabel("PPO iteration")
    ax.set_ylabel("reward-model score", color=method_color(name))
    twin = ax.twinx()
    styles = iter([{"linestyle": "-", "alpha": 0.6}, {"linestyle": "--", "marker": "o"}, {"linestyle": ":"}])
    for key in gold:
        gx, gy = series(rows, key)
        if gx:
            where = "held-out prompts, greedy" if key.startswith("eval") else "training samples"
            twin.plot(gx, gy, color="black", linewidth=1.5, label=f"gold: {where} ({key})", **next(styles))
    twin.set_ylabel("gold accuracy")
    twin.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_title(f"{name}: proxy reward vs gold accuracy")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # below the axes: the curves cross, so no corner inside the plot is reliably empty
    fig.legend(handles, [h.get_label() for h in handles], fontsize=9, loc="outside lower center", ncol=1,
               frameon=False)
    return _save(fig, path)


def plot_panels(panels: list[tuple[str, str, dict[str, list[dict]]]], path: str | Path, *, title: str = "",
                ncols: int = 3) -> Path:
    """Small multiples: ``panels`` is [(title, metric, {run name: metric rows})]; each panel draws ``metric``
    of its runs against the step, each run in its colour, with one legend for the figure."""
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL[0] * ncols, PANEL[1] * nrows + 0.5), squeeze=False,
                             layout="constrained")
    for ax, (panel_title, metric, runs) in zip(axes.flat, panels):
        for name, rows in runs.items():
            xs, ys = series(rows, metric)
            if xs:
                _line(ax, xs, ys, name)
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel(metric, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=12)
    _legend_below(fig, list(axes.flat)[:len(panels)])
    return _save(fig, path)


def _legend_below(fig, axes) -> None:
    """One legend under the figure with every run drawn in any of ``axes`` (each name once, first-seen order)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(len(seen), 7), fontsize=9,
                   frameon=False)
