"""Degenerate evidence is named, not judged: each check of `posttrain.eval.health` on an evaluation built to show it,
the demo's verdicts withheld for it, a healthy comparison with no warning, and the health line of a training run."""

import pytest

from posttrain.eval.health import eval_warnings, kl_outliers, paired_warnings, training_health
from posttrain.report.demo import findings
from posttrain.report.evidence import method_warnings


def ev(greedy, samples, *, kl=1.0, eos=1.0, measure="sampled_gold_score"):
    """An eval.json as `posttrain eval` writes it for a graded task: per prompt a greedy score and sample scores."""
    n = len(samples)
    return {"measure": measure, "sampled_gold_score": sum(sum(s) / len(s) for s in samples) / n,
            "gold_score": sum(greedy) / n, "kl": kl, "eos_rate": eos, "num_prompts": n, "num_samples": len(samples[0]),
            "samples": [{"prompt": f"p{i}", "greedy_score": g, "sample_scores": s}
                        for i, (g, s) in enumerate(zip(greedy, samples))]}


SFT = ev([0.5, 0.0, 1.0, 0.5], [[0.5, 0.0], [0.0, 0.5], [1.0, 0.5], [0.5, 1.0]], kl=0.0)


def names(warnings):
    return sorted(w.name for w in warnings)


def test_zero_variance_paired_differences_get_no_verdict():
    """Every prompt gains exactly +0.25 (0.5 - 0.25, 0.5 - 0.25, ...): a standard error of 0 from copies of one
    outcome. The issue's case: "+50.0 ± 0.0 points" printed as an improvement."""
    base = ev([0.5] * 4, [[0.5, 0.0]] * 4, kl=0.0)
    method = ev([1.0] * 4, [[0.5, 0.5]] * 4, kl=2.0)
    assert names(paired_warnings([0.5] * 4, [0.25] * 4)) == ["zero-variance"]
    text = findings({"sft": base, "dpo": method}, {}, "sentiment")
    assert "**No verdict (degenerate evidence):** dpo (" in text and "zero-variance" in text
    assert "**Improved on SFT:** none." in text and "± 0.0" not in text


def test_all_prompts_giving_one_greedy_output():
    warnings = eval_warnings(ev([0.5] * 4, [[0.5, 0.0], [0.0, 1.0], [1.0, 0.5], [0.5, 1.0]]))
    assert names(warnings) == ["one-greedy-output"]
    assert "one outcome (gold score 0.5) on all 4 prompts" in warnings[0].text
    assert eval_warnings(SFT) == []  # greedy scores 0.5, 0, 1, 0.5 vary


def test_a_method_whose_eval_never_changed():
    """The same per-prompt sampled scores as SFT: unchanged; or any scores with a KL of 0.002 nats to SFT."""
    same = ev([0.5, 0.0, 1.0, 0.5], [[0.5, 0.0], [0.0, 0.5], [1.0, 0.5], [0.5, 1.0]], kl=0.5)
    assert names(method_warnings({"sft": SFT, "dpo-iter": same}, "sampled_gold_score")["dpo-iter"]) == ["eval-unchanged"]
    assert names(paired_warnings([], [], kl=0.002)) == ["eval-unchanged"]
    text = findings({"sft": SFT, "dpo-iter": same}, {}, "sentiment")
    assert "**No verdict (degenerate evidence):** dpo-iter (eval-unchanged)" in text


def test_a_kl_far_outside_the_other_methods():
    """Median of the others: dpo's 16.5 vs median(0.6, 0.8, 1.2) = 0.8: 16.5 > 4 x 0.8, flagged (21x); the
    others each sit under 4x their others' median (which includes 16.5)."""
    out = kl_outliers({"ppo-rm": 0.6, "ppo-verifier": 0.8, "dpo-iter": 1.2, "dpo": 16.5})
    assert list(out) == ["dpo"] and "21x the other methods' median 0.80" in out["dpo"].text
    assert kl_outliers({"a": 0.01, "b": 0.02, "c": 0.5}) == {}  # under the 1-nat floor: no drift worth a word
    assert kl_outliers({"a": 1.0, "b": 30.0}) == {}  # one other method is no range


def test_an_eos_rate_collapse():
    assert names(eval_warnings({"eos_rate": 0.3})) == ["eos-collapse"]
    assert names(paired_warnings([], [], eos=0.6, base_eos=0.95)) == ["eos-collapse"]  # a 35-point drop
    assert paired_warnings([], [], eos=0.9, base_eos=0.95) == []


def test_zero_reward_spread_within_groups():
    flat = ev([1.0, 0.0, 0.5, 0.5], [[1.0, 1.0], [0.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    warnings = eval_warnings(flat)
    assert names(warnings) == ["flat-group-reward"] and "on 100% of the prompts all 2 samples" in warnings[0].text


def test_a_healthy_comparison_gets_no_warning_and_a_verdict():
    """Per-prompt sampled means: ppo 0.5, 0.75, 0.75, 1 (mean 0.75), sft 0.25, 0.25, 0.75, 0.75 (mean 0.5); gains
    0.25, 0.5, 0, 0.25: paired mean 0.25,
    sample variance (0 + 0.0625 + 0.0625 + 0) / 3 = 0.04167, SE = sqrt(0.04167 / 4) = 0.102; 0.25 > 2 x 0.102."""
    ppo = ev([1.0, 0.5, 1.0, 1.0], [[1.0, 0.0], [0.5, 1.0], [1.0, 0.5], [1.0, 1.0]], kl=0.8)
    dpo = ev([0.5, 0.5, 1.0, 0.0], [[0.5, 0.5], [0.5, 0.0], [1.0, 1.0], [0.0, 0.5]], kl=0.6)
    warnings = method_warnings({"sft": SFT, "ppo-verifier": ppo, "dpo": dpo, "ppo-rm": ppo}, "sampled_gold_score")
    assert all(ws == [] for ws in warnings.values()), warnings
    text = findings({"sft": SFT, "ppo-verifier": ppo}, {}, "sentiment")
    assert "ppo-verifier improved on sft (mean gold score over samples 75.0% vs 50.0%, +25.0 ± 10.2 points)" in text
    assert "Warning" not in text and "No verdict" not in text


def test_the_health_line_of_a_ppo_run():
    """KL 0.01 -> 2.5; the last rollout: 48 of 64 samples ended with EOS = 75%, clipped 25%; zero-std groups
    0.25 and 0.75: mean 50%."""
    rows = [{"step": 0, "data/examples": 100, "data/truncated": 5},
            {"step": 1, "objective/kl": 0.01, "val/num_eos_tokens": 60, "frac_reward_zero_std": 0.25},
            {"step": 2, "objective/kl": 2.5, "val/num_eos_tokens": 48, "frac_reward_zero_std": 0.75}]
    line, warnings = training_health(rows, {"rollout": {"batch_size": 64}})
    assert line == ("health: KL 0.01 -> 2.5 nats; EOS rate 75% (clipped completions 25%); zero-variance reward groups "
                    "50%; truncated rows 5%; warnings: none")
    assert warnings == []


def test_the_health_line_names_a_run_that_did_nothing():
    """online DPO, 8 prompts a round: 0 pairs twice = every prompt's samples tied; KL never left 0; EOS 20%."""
    rows = [{"round": 1, "pairs": 0, "rollout/eos_rate": 0.2}, {"round": 2, "pairs": 0, "rollout/eos_rate": 0.2}]
    line, warnings = training_health(rows, {"prompts_per_round": 8})
    assert names(warnings) == ["eos-collapse", "flat-group-reward"]
    assert line.startswith("health: EOS rate 20% (clipped completions 80%); zero-variance reward groups 100%; "
                           "warnings: eos-collapse")
    _, warnings = training_health([{"objective/kl": 0.0}, {"objective/kl": 0.001}], {})
    assert names(warnings) == ["eval-unchanged"]


@pytest.mark.parametrize("loss", [[0.69, 0.31]])
def test_the_health_line_of_a_supervised_run(loss):
    rows = [{"step": 0, "data/examples": 10, "data/truncated": 0}] + [{"step": i, "loss": v} for i, v in enumerate(loss)]
    assert training_health(rows, {})[0] == "health: loss 0.69 -> 0.31; warnings: none"


def test_a_training_command_ends_with_its_health_line(tiny_model, arith_dir, tmp_path, capsys):
    from posttrain.cli import main

    assert main(["sft", f"model={tiny_model}", f"data.train={arith_dir / 'sft.jsonl'}", f"output_dir={tmp_path}",
                 "max_steps=3", "batch_size=4", "max_length=64", "logging.steps=1", "logging.progress=false"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("health: loss ") and last.endswith("warnings: none")


def test_grpo_health_line_reads_trl_names():
    """grpo logs TRL's `kl` and `completions/clipped_ratio`: the health line reads them as ppo's KL and EOS rate."""
    from posttrain.eval.health import training_health

    rows = [{"step": 1, "loss": 0.5, "kl": 0.0, "completions/clipped_ratio": 0.25},
            {"step": 2, "loss": 0.4, "kl": 0.02, "completions/clipped_ratio": 0.9}]
    line, warnings = training_health(rows, {})
    assert "KL 0 -> 0.02 nats" in line and "EOS rate 10%" in line
    assert [w.name for w in warnings] == ["eos-collapse"]
