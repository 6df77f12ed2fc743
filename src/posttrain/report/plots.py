"""PNG plots for reports (matplotlib, Agg backend: no display needed).

One colour per method name in every plot: the demo's methods have fixed colours, any other
name gets one from a stable hash (crc32, not Python's salted ``hash``).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

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


def method_color(name: str) -> str:
    """The colour of a method in every plot (``ppo_rm`` and ``PPO-RM`` are the same method)."""
    key = name.strip().lower().replace("_", "-")
    if key in METHOD_COLORS:
        return METHOD_COLORS[key]
    return FALLBACK_COLORS[zlib.crc32(key.encode()) % len(FALLBACK_COLORS)]


def series(rows: list[dict], metric: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over metric rows; rows without it are skipped, x = ``step`` or the row number."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = row.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(float(row.get("step", i)))
            ys.append(float(value))
    return xs, ys


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: dict[str, list[dict]], metric: str, path: str | Path) -> Path:
    """One line per run of ``metric`` against the optimizer step, saved as a PNG."""
    return _save(curves_figure(runs, metric), path)


def curves_figure(runs: dict[str, list[dict]], metric: str):
    """The figure of :func:`plot_curves` (the caller saves or closes it)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, rows in runs.items():
        xs, ys = series(rows, metric)
        if xs:
            ax.plot(xs, ys, label=name, color=method_color(name), linewidth=1.8, marker="o" if len(xs) < 12 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def plot_frontier(points: dict[str, tuple[float, float]], path: str | Path) -> Path:
    """Gold accuracy against KL to the SFT model, one point per method: the reward-KL frontier
    (Rafailov et al. 2023, Fig. 2). Up and to the left is better."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, (kl, gold) in points.items():
        ax.scatter([kl], [gold], s=70, color=method_color(name), label=name, edgecolors="black", linewidths=0.6, zorder=3)
        ax.annotate(name, (kl, gold), textcoords="offset points", xytext=(6, 5), fontsize=9)
    ax.set_xlabel("KL to the SFT model (nats per response)")
    ax.set_ylabel("gold accuracy (held-out prompts)")
    ax.set_title("reward-KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    return _save(fig, path)


def plot_proxy_vs_gold(rows: list[dict], path: str | Path, *, proxy: str = "objective/scores",
                       gold: str = "eval/gold_accuracy", name: str = "ppo-rm") -> Path:
    """Proxy reward (the reward model's score) and gold reward over training, on twin y-axes:
    when the proxy keeps rising while gold falls, the policy over-optimises the reward model
    (Gao et al. 2023, "Scaling laws for reward model overoptimization")."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    xs, ys = series(rows, proxy)
    ax.plot(xs, ys, color=method_color(name), linewidth=1.8, label=f"proxy ({proxy})")
    ax.set_xlabel("step")
    ax.set_ylabel(f"proxy reward ({proxy})")
    twin = ax.twinx()
    gx, gy = series(rows, gold)
    twin.plot(gx, gy, color="black", linestyle="--", marker="o", linewidth=1.5, label=f"gold ({gold})")
    twin.set_ylabel(f"gold reward ({gold})")
    ax.set_title(f"{name}: proxy vs gold reward")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # below the axes: the two curves cross, so no corner inside the plot is reliably empty
    ax.legend(handles, [h.get_label() for h in handles], fontsize=9, loc="upper center",
              bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    return _save(fig, path)


def plot_grid(name: str, rows: list[dict], metrics: list[str], path: str | Path, *, ncols: int = 3) -> Path:
    """Small multiples: one panel per metric of one run, against the step, in the run's colour."""
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 2.9 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        xs, ys = series(rows, metric)
        ax.plot(xs, ys, color=method_color(name), linewidth=1.6, marker="o" if len(xs) < 12 else None)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel(metric, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(name, color=method_color(name), fontsize=12)
    return _save(fig, path)
