"""`posttrain report` on two run folders written by the test (real files, real matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from posttrain.config import ConfigError, ReportConfig
from posttrain.report import main, results_table, write_report
from posttrain.report.plots import METHOD_COLORS, curves_figure, method_color

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(folder: Path, rows: list[dict], evaluation: dict | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation))
    return folder


@pytest.fixture
def runs(tmp_path):
    sft = _write_run(tmp_path / "sft", [{"step": s, "epoch": s / 10, "loss": 2.0 / s, "learning_rate": 1e-3} for s in range(1, 11)],
                     {"gold_accuracy": 0.41, "kl": 0.0, "pass@1": 0.41, "mean_length": 7.5, "eos_rate": 0.98, "wall_time_s": 12.0})
    ppo_rows = [{"step": s, "loss": 1.0 / s, "objective/scores": 0.1 * s, "objective/kl": 0.02 * s} for s in range(1, 9)]
    for s in (4, 8):
        ppo_rows.append({"step": s, "eval/gold_accuracy": 0.4 + 0.05 * s, "sample": "1+2=3"})
    ppo = _write_run(tmp_path / "ppo-rm", ppo_rows,
                     {"gold_accuracy": 0.62, "kl": 3.1, "pass@1": 0.62, "mean_length": 6.0, "eos_rate": 1.0,
                      "wall_time_s": 40.0, "reward": {"mean": 1.5}})
    return sft, ppo


def test_report_writes_markdown_and_pngs(runs, tmp_path):
    out = write_report(list(runs), tmp_path / "report", "demo", extra_sections={"Notes": "PPO beat SFT here."})
    text = out.read_text()
    assert out == tmp_path / "report" / "report.md"
    assert "# demo" in text and "| sft |" in text and "| ppo-rm |" in text and "## Notes" in text
    header = next(line for line in text.splitlines() if line.startswith("| run |"))
    assert header.split(" | ")[1] == "gold_accuracy" and "reward/mean" in header  # gold first, nested keys flattened
    images = [line[line.index("(") + 1:-1] for line in text.splitlines() if line.startswith("![")]
    names = {Path(p).name for p in images}
    # shared: loss only; sft's own: learning_rate; ppo-rm's own grid; frontier; proxy vs gold
    assert {"frontier.png", "curve_loss.png", "sft_metrics.png", "ppo_rm_metrics.png", "ppo_rm_proxy_vs_gold.png"} <= names
    assert "curve_epoch.png" not in names and "curve_step.png" not in names
    for rel in images:
        assert (out.parent / rel).read_bytes()[:8] == PNG_MAGIC


def test_results_table_cells():
    """Union of keys, floats to 4 significant digits, a missing value left empty."""
    table = results_table(["a", "b"], [{"gold_accuracy": 0.123456, "x": True}, {"gold_accuracy": 1.0}])
    assert table.splitlines() == ["| run | gold_accuracy | x |", "|---|---|---|", "| a | 0.1235 | yes |", "| b | 1 |  |"]


def test_same_method_same_colour():
    """The palette is fixed for the demo's methods; spelling variants map to one method; other names get a
    stable colour (same in every call, and used by the plots)."""
    assert method_color("ppo-rm") == method_color("PPO_RM") == METHOD_COLORS["ppo-rm"]
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    assert method_color("my-method") == method_color("my-method")
    fig = curves_figure({"dpo": [{"step": 1, "loss": 1.0}], "sft": [{"step": 1, "loss": 2.0}]}, "loss")
    ax = fig.axes[0]
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert colors == {"dpo": METHOD_COLORS["dpo"], "sft": METHOD_COLORS["sft"]}
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dpo", "sft"]
    plt.close(fig)


def test_main_single_run_defaults_to_its_folder(runs, capsys):
    path = main(ReportConfig(runs=[str(runs[0])]))
    assert path == runs[0] / "report.md" and "report:" in capsys.readouterr().out
    with pytest.raises(ConfigError):
        main(ReportConfig(runs=[]))
    with pytest.raises(ConfigError, match="not found"):
        main(ReportConfig(runs=[str(runs[0] / "missing")]))
