"""`posttrain report` on run folders written by the test (real files, real matplotlib, PNGs read back)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest

from posttrain.config import ConfigError, ReportConfig
from posttrain.report import (
    curve_metrics,
    main,
    proxy_is_not_gold,
    read_reward_config,
    results_table,
    run_kind,
    summary_table,
    write_report,
)
from posttrain.report.plots import METHOD_COLORS, curves_figure, method_color

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DATA_ROW = {"step": 0, "data/train_rows": 100, "data/skipped": 0}


def _write_run(folder: Path, rows: list[dict], evaluation: dict | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if evaluation is not None:
        (folder / "eval.json").write_text(json.dumps(evaluation))
    return folder


def _eval(greedy: list[float], sampled: list[list[float]], kl: float, reward: float) -> dict:
    """An eval.json as `posttrain eval` writes it: headline numbers and one record per prompt."""
    n = len(greedy)
    return {"gold_accuracy": sum(greedy) / n, "gold_score": sum(greedy) / n,
            "pass@1": sum(sum(s) / len(s) for s in sampled) / n, "pass@2": 0.75, "reward": reward, "kl": kl,
            "length": 7.25, "eos_rate": 0.975, "num_prompts": n, "num_samples": 2, "eval_seconds": 3.5,
            "samples": [{"prompt": f"What is {i} + 1?", "samples": ["a", "b"], "sample_scores": s,
                         "greedy": "a", "greedy_score": g} for i, (g, s) in enumerate(zip(greedy, sampled))]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three methods of three families. sft: 4 prompts, greedy 1,1,0,1; samples (1,0),(1,1),(0,0),(1,0)."""
    demo = tmp_path_factory.mktemp("runs") / "demo"
    sft = _write_run(demo / "sft", [DATA_ROW] + [{"step": s, "epoch": s / 10, "loss": 2.0 / s, "learning_rate": 1e-3,
                                                  "tokens_per_second": 900.0} for s in range(1, 11)],
                     _eval([1, 1, 0, 1], [[1, 0], [1, 1], [0, 0], [1, 0]], 0.0, -0.5))
    ppo_rows = [{"step": 0, "eval/gold_accuracy": 0.75, "eval/sampled_accuracy": 0.5, "episodes": 0}]
    ppo_rows += [{"step": s, "objective/scores": 0.2 * s, "objective/gold": 0.6 - 0.05 * s, "objective/kl": 0.02 * s,
                  "objective/entropy": 3.0, "loss/value_avg": 0.1, "policy/clipfrac_avg": 0.01, "episodes": 8 * s,
                  "rollout/seconds": 1.5, "grad_norm": 1.0} for s in range(1, 9)]
    ppo_rows += [{"step": 8, "eval/gold_accuracy": 0.5, "eval/sampled_accuracy": 0.25}]
    ppo = _write_run(demo / "ppo-rm", ppo_rows, _eval([1, 0, 0, 1], [[1, 0], [0, 0], [0, 0], [1, 1]], 3.14159, 1.5))
    (ppo / "config.yaml").write_text("seed: 0\nreward:\n  model: /runs/rm/final\n  task: ''\n")
    dpo_rows = [{"step": s, "loss": 0.69 - 0.01 * s, "rewards/accuracies": 0.5 + 0.05 * s, "rewards/margins": 0.1 * s,
                 "logps/chosen": -3.0} for s in range(1, 6)]
    dpo = _write_run(demo / "dpo", [DATA_ROW] + dpo_rows,
                     _eval([1, 1, 1, 1], [[1, 1], [1, 1], [1, 0], [1, 1]], 1.0, 0.25))
    (demo / "demo.json").write_text(json.dumps({"seconds": {"sft": 12.4, "ppo-rm": 1234.5, "dpo": 7.0, "task": 1.0}}))
    return sft, ppo, dpo


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    """The report of the three runs (written once: matplotlib takes seconds on a loaded machine)."""
    return write_report(list(runs), tmp_path_factory.mktemp("report"), "demo", intro="We ran three methods.",
                        findings="**Improved on SFT:** dpo.", extra_sections={"Wall time per stage": "| a |"})


def _images(text: str) -> list[str]:
    return re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", text, flags=re.M)


def test_report_sections_in_order_and_the_plots_that_matter(report):
    text = report.read_text()
    assert report.name == "report.md"
    order = ["# demo", "We ran three methods.", "## What this shows", "**Improved on SFT:** dpo.", "## Results",
             "<details><summary>All evaluation fields", "## Plots", "### Gold accuracy against KL",
             "### Held-out gold accuracy during training", "### ppo-rm: proxy reward against gold",
             "### Training curves: SFT and reward model", "### Training curves: DPO family",
             "### Training curves: PPO family", "<details><summary>Other training curves", "## Wall time per stage"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    names = [Path(p).name for p in _images(text)]
    assert names[:7] == ["frontier.png", "gold_during_training.png", "ppo_rm_proxy_vs_gold.png", "curves_sft_rm.png",
                         "curves_dpo.png", "curves_ppo.png", "more_dpo.png"]  # logps/chosen: dpo's other curve
    assert not any("data" in n or "learning_rate" in n or "loss.png" in n for n in names)
    for line in text.splitlines():  # every plot has a one-line caption right under it
        if line.startswith("!["):
            below = text.splitlines()[text.splitlines().index(line) + 2]
            assert below.startswith("*") or below.startswith("![") or below == "</details>", line
    for rel in _images(text):
        assert (report.parent / rel).read_bytes()[:8] == PNG_MAGIC


def test_table_one_row_per_run_with_formatted_numbers(report):
    """sft, hand-computed: gold 3/4 = 75.0%; per-prompt pass@1 0.5, 1, 0, 0.5: mean 0.5, sample variance
    (0 + 0.25 + 0.25 + 0) / 3 = 1/6, SE = sqrt(1/6 / 4) = 0.2041 -> "50.0% ± 20.4". Wall times come from the
    demo.json beside the runs."""
    text = report.read_text()
    table = text[text.index("## Results"):text.index("<details>")].strip().splitlines()[2:]
    assert table[0] == ("| method | gold acc. (greedy) | pass@1 (sampled) ± SE | pass@2 | RM score | KL to SFT (nats) "
                        "| mean length (tokens) | EOS rate | wall time |")
    assert table[2] == "| sft | 75.0% | 50.0% ± 20.4 | 75.0% | -0.500 | 0.00 | 7.2 | 97.5% | 12 s |"
    assert table[3].startswith("| ppo-rm | 50.0% | 37.5% ± ") and "| 3.14 |" in table[3] and table[3].endswith(
        "| 1,234 s |")
    assert [row.split(" | ")[0] for row in table[2:]] == ["| sft", "| ppo-rm", "| dpo"]
    assert "num_prompts" not in table[0] and "eval_seconds" not in table[0]  # in the <details> table instead
    assert "| run | gold_accuracy | gold_score | pass@1 |" in text


def test_summary_table_drops_columns_no_run_has():
    table = summary_table(["a", "b"], [{"gold_accuracy": 0.5, "kl": 1.0}, {}], {})
    assert table.splitlines() == ["| method | gold acc. (greedy) | KL to ref. (nats) |", "|---|---:|---:|",
                                  "| a | 50.0% | 1.00 |", "| b |  |  |"]


def test_curves_skip_counters_and_losses_of_different_methods_never_share_an_axis(runs):
    sft_rows = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert curve_metrics(sft_rows) == ["loss"]  # no data/*, epoch, learning_rate, tokens_per_second
    ppo_rows = [json.loads(x) for x in (runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert not {"episodes", "rollout/seconds"} & set(curve_metrics(ppo_rows))
    kinds = [run_kind(curve_metrics([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()]))
             for r in runs]
    assert kinds == ["sft", "ppo", "dpo"]
    assert run_kind(["loss", "accuracy", "margin"]) == "rm" and run_kind(["foo"]) == "other"
    # proxy vs gold: for a learned reward only; a verifier's scores (here shifted by an EOS penalty) are the gold
    assert proxy_is_not_gold(ppo_rows, read_reward_config(runs[1]))
    verifier = [{**r, "objective/scores": r["objective/gold"] - 0.1} for r in ppo_rows if "objective/gold" in r]
    assert not proxy_is_not_gold(verifier, {"model": "", "task": "arithmetic"})
    assert proxy_is_not_gold(ppo_rows, {}) and not proxy_is_not_gold(sft_rows, {})  # no config: by the numbers


def _has_colour(png: Path, hex_colour: str) -> bool:
    """Whether any pixel of the PNG is exactly this colour (line centres are drawn unblended)."""
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = np.round(mpimg.imread(png)[..., :3] * 255).astype(int)
    return bool((np.abs(pixels - rgb).sum(-1) == 0).any())


def test_the_same_method_keeps_its_colour_across_plots(report):
    plots = report.parent / "plots"
    ppo, dpo = METHOD_COLORS["ppo-rm"], METHOD_COLORS["dpo"]
    for png in ("frontier.png", "gold_during_training.png", "ppo_rm_proxy_vs_gold.png", "curves_ppo.png"):
        assert _has_colour(plots / png, ppo), png
    for png in ("frontier.png", "curves_dpo.png"):
        assert _has_colour(plots / png, dpo), png
    assert not _has_colour(plots / "curves_dpo.png", ppo) and not _has_colour(plots / "curves_ppo.png", dpo)


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


def test_main_single_run_defaults_to_its_folder(runs, capsys, tmp_path):
    (runs[0] / "plots").mkdir()
    (runs[0] / "plots" / "curve_loss.png").write_bytes(PNG_MAGIC)  # from an earlier report: removed
    path = main(ReportConfig(runs=[str(runs[0])]))
    assert path == runs[0] / "report.md" and "report:" in capsys.readouterr().out
    assert sorted(p.name for p in (runs[0] / "plots").iterdir()) == ["curves_sft_rm.png", "frontier.png"]
    text = path.read_text()
    assert "| sft | 75.0% |" in text and "curves_sft_rm.png" in text and "## What this shows" not in text
    bare = _write_run(tmp_path / "bare", [{"step": s, "my/metric": s * 0.5} for s in range(3)], None)
    text = main(ReportConfig(runs=[str(bare)])).read_text()  # no eval.json, unknown method: its curves only
    assert "## Results" not in text and "curves_other.png" in text
    with pytest.raises(ConfigError):
        main(ReportConfig(runs=[]))
    with pytest.raises(ConfigError, match="not found"):
        main(ReportConfig(runs=[str(runs[0] / "missing")]))
