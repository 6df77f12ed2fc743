"""examples/rrhf.py, the worked example of docs/adding_a_recipe.md: its loss by hand, and the recipe run end to
end (so the guide's code cannot rot)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import DPOConfig, load_config
from posttrain.data import collate_pairs, load_examples, tokenize_preference
from posttrain.engine import read_metrics
from posttrain.models import load_causal_lm, load_tokenizer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rrhf.py"


@pytest.fixture(scope="module")
def rrhf():
    spec = importlib.util.spec_from_file_location("rrhf_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rrhf_loss_by_hand(rrhf):
    """Pair 1: log pi(y_w) = -2 over 2 tokens (p_w = -1), log pi(y_l) = -6 over 3 tokens (p_l = -2): ordered
    rightly, hinge max(0, -2 - (-1)) = 0; NLL(y_w) = 2; loss 2.
    Pair 2, the same swapped: p_w = -2, p_l = -1: hinge max(0, -1 - (-2)) = 1; NLL(y_w) = 6; loss 7."""
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, rank, nll = rrhf.rrhf_loss(t(-2.0, -6.0), t(-6.0, -2.0), t(2, 3), t(3, 2))
    assert rank.tolist() == [0.0, 1.0] and nll.tolist() == [2.0, 6.0] and loss.tolist() == [2.0, 7.0]


def test_one_accumulated_step_logs_the_mean_loss_of_the_starting_model(rrhf, tiny_model, arith_dir, tmp_path):
    """12 pairs, one step of 2 micro-batches of 6: the logged loss is the mean over the 12 pairs of rrhf_loss
    computed from the starting model directly (collate_pairs, one forward) — the recipe's layout, accumulation and
    normalisation change nothing; final/ is written."""
    rows = (arith_dir / "prefs.jsonl").read_text().splitlines()[:12]
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    cfg = load_config(DPOConfig, None, [f"model={tiny_model}", f"data.train={data}", f"output_dir={out}",
                                        "batch_size=6", "grad_accum=2", "max_steps=1", "max_length=64",
                                        "data.eval_split=0", "logging.progress=false", "resume=false"])
    result = rrhf.main(cfg)

    tok = load_tokenizer(tiny_model)
    model = load_causal_lm(tiny_model, dtype="float32", device="cpu", tokenizer=tok).eval()
    examples, _ = load_examples([str(data)], "preference")
    items = [tokenize_preference(tok, ex, max_length=64) for ex in examples]
    with torch.no_grad():
        logps, n = rrhf.completion_logps(model, collate_pairs(items, tok.pad_token_id))  # (24,), (24,)
        expected, rank, _ = rrhf.rrhf_loss(logps[:12], logps[12:], n[:12], n[12:])
    logged = [r for r in read_metrics(out) if "loss" in r]
    assert result["step"] == 1 and len(logged) == 1
    assert logged[0]["loss"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert logged[0]["rank_loss"] == pytest.approx(float(rank.mean()), rel=1e-4, abs=1e-6)
    assert 0.0 <= logged[0]["accuracy"] <= 1.0
    assert (out / "final" / "config.json").is_file()


def test_a_reference_model_is_refused_by_name(tiny_model, tmp_path):
    cmd = [sys.executable, str(EXAMPLE), f"model={tiny_model}", f"ref_model={tiny_model}", "beta=0.5",
           f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unset beta, ref_model" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
