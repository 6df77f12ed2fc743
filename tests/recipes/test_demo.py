"""`posttrain demo`: the whole pipeline at --quick scale into a temporary folder, rerun skipping, stage failure,
and the "what this shows" text written from the numbers."""

import json
import os
import time

import pytest

from posttrain.cli import main
from posttrain.config import DemoConfig
from posttrain.recipes.demo import is_fresh, pipeline
from posttrain.report.demo import METHODS, difference, findings

STAGES = ["tiny", "task", "sft", "rm", "ppo-rm", "ppo-verifier", "dpo", "sft-chosen", "sft+dpo", "dpo-iter", "kto", "orpo",
          "simpo", "grpo", "dr_grpo", "dapo"]


def test_quick_demo_end_to_end_then_rerun_skips_done_stages(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    # every stage is an ordinary command with a config file under examples/demo/, printed as it runs
    assert "+ posttrain sft " in printed and "examples/demo/sft.yaml" in printed
    assert "+ posttrain online-dpo " in printed and "+ posttrain eval " in printed
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ")]
    for method in METHODS:
        assert any(line.startswith(f"| {method} |") for line in table), method
        ev = json.loads((out / method / "eval.json").read_text())
        assert {"gold_accuracy", "pass@1", "pass@2", "reward", "kl", "length", "eos_rate"} <= set(ev)
    assert json.loads((out / "sft" / "eval.json").read_text())["kl"] == 0.0  # SFT against itself
    for png in ("frontier.png", "ppo_rm_proxy_vs_gold.png", "curves_dpo.png", "curves_ppo.png"):
        assert (out / "plots" / png).stat().st_size > 1000, png
    assert report.index("## What this shows") < report.index("## Results") < report.index("## Wall time per stage")
    assert set(json.loads((out / "demo.json").read_text())["seconds"]) >= set(STAGES)
    # one seed: indicative verdicts; the claims table and the classification side, head only to LoRA
    assert "One seed: indicative only" in report and "## Claims of the background paper" in report
    assert "| PPO beats DPO on a verifiable task |" in report and "| PPO with a reference EMA beats PPO without |" in report
    for variant in ("head", "top2", "all", "lora"):
        done = "adapter_config.json" if variant == "lora" else "config.json"  # LoRA's final/ is a PEFT adapter
        assert (out / "classify" / variant / "final" / done).is_file(), variant
    assert "| head only |" in report and "| LoRA r=8 + head |" in report

    # rerun: every stage is done; removing one model reruns it and its evaluation only
    (out / "dpo-iter" / "final" / "config.json").unlink()
    assert main(["demo", "--quick", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    ran = [line.split()[2] for line in printed.splitlines() if line.startswith("+ posttrain ")]
    assert ran == ["online-dpo", "eval"]
    assert "= sft: done" in printed and "= eval ppo-rm: done" in printed


def test_other_settings_in_the_same_folder_need_force(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"settings": {"task": "arithmetic", "quick": True, "seed": 0,
                                                            "ablation": False}, "seconds": {}}))
    assert main(["demo", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "quick: True -> False" in err and "--force" in err


def test_a_failing_stage_stops_the_demo_with_its_name(tmp_path, capsys):
    """A broken model folder where the tiny model should be: `tiny` counts as done, `task` runs, `sft` fails."""
    out = tmp_path / "demo"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny" / "config.json").write_text("{not a model config")
    assert main(["demo", "--quick", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "demo stage `sft` failed" in err and str(out) in err
    assert (out / "task" / "eval.jsonl").is_file()  # what the earlier stage wrote stays
    assert not (out / "sft" / "final").exists() and not (out / "report.md").exists()


def test_a_stage_is_stale_when_an_input_is_newer(tmp_path):
    stages = {s.name: s for s in pipeline("arithmetic", tmp_path)}
    for rel in ("sft/final/config.json", "dpo/final/config.json"):
        (tmp_path / rel).parent.mkdir(parents=True)
        (tmp_path / rel).write_text("{}")
    now = time.time()
    os.utime(tmp_path / "sft/final/config.json", (now - 10, now - 10))
    assert is_fresh(stages["dpo"], tmp_path, stages)
    os.utime(tmp_path / "sft/final/config.json", (now + 10, now + 10))  # SFT was retrained after DPO
    assert not is_fresh(stages["dpo"], tmp_path, stages)
    assert not is_fresh(stages["ppo-rm"], tmp_path, stages)  # never ran


def test_findings_say_plainly_when_a_method_did_not_improve():
    """No per-prompt records: the unpaired bound. ppo-verifier vs sft, pooled p = 0.6: SE = sqrt(2 * 0.24 / 200)
    = 4.9 points; at p = 0.5 two standard errors are 2 * sqrt(2 * 0.25 / 200) = 10 points."""
    ev = lambda acc, kl: {"gold_accuracy": acc, "pass@1": acc, "kl": kl, "eos_rate": 1.0, "num_prompts": 200}  # noqa: E731
    evals = {"sft": ev(0.50, 0.0), "ppo-verifier": ev(0.70, 3.0), "dpo": ev(0.45, 5.0), "dpo-iter": ev(0.30, 9.0),
             "ppo-rm": ev(0.52, 1.0), "kto": ev(0.50, 1.0), "orpo": ev(0.50, 1.0), "simpo": ev(0.50, 1.0)}
    curves = {"ppo-rm": [{"step": 0, "eval/gold_accuracy": 0.5}, {"step": 1, "objective/scores": -1.0},
                         {"step": 2, "objective/scores": 2.0, "eval/gold_accuracy": 0.3}]}
    text = findings(evals, curves, "arithmetic")
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("- ")}
    assert "ppo-verifier improved on sft (gold accuracy (greedy) 70.0% vs 50.0%, +20.0 ± 4.9 points)" in text
    assert "**Improved on SFT:** ppo-verifier (+20.0 ± 4.9 points)." in text
    assert "**Worse than SFT:** dpo-iter (-20.0 ± 4.9 points)." in text
    assert "**Not evaluated:** sft+dpo, grpo, dr_grpo, dapo." in text
    assert "ppo-rm did NOT improve on sft" in lines["ppo-rm"] and "within noise" in lines["ppo-rm"]
    assert "dpo did NOT improve on sft" in lines["dpo"] and "within noise" in lines["dpo"]
    assert "dpo-iter did NOT improve on, and is worse than sft" in lines["dpo-iter"]
    assert "sft+dpo: no evaluation" in text
    assert "online DPO vs offline DPO (Xu et al.: DPO-Iter above DPO): dpo-iter did NOT improve on, and is worse than dpo" in text
    assert "over-optimised the proxy reward" in text
    assert "KTO on the same pairs unpaired vs DPO: kto did NOT improve on dpo" in text  # 50% vs 45%: +5 < 2 SE


def test_differences_are_paired_over_the_same_prompts():
    """Per-prompt greedy verdicts a = 1,1,1,0 and b = 1,0,1,0: d = 0,1,0,0, mean 0.25, sample variance
    (3 * 0.0625 + 0.5625) / 3 = 0.25, SE = sqrt(0.25 / 4) = 0.25. Other prompts: the unpaired bound instead,
    sqrt(2 * p (1-p) / n) at the pooled p = 0.625: sqrt(2 * 0.234375 / 4) = 0.3423."""
    def ev(verdicts, prompt="q"):
        return {"gold_accuracy": sum(verdicts) / 4, "num_prompts": 4,
                "samples": [{"prompt": f"{prompt}{i}", "greedy_score": float(v)} for i, v in enumerate(verdicts)]}

    d, se = difference(ev([1, 1, 1, 0]), ev([1, 0, 1, 0]), "gold_accuracy")
    assert d == pytest.approx(0.25) and se == pytest.approx(0.25)
    d, se = difference(ev([1, 1, 1, 0]), ev([1, 0, 1, 0], prompt="other"), "gold_accuracy")
    assert d == pytest.approx(0.25) and se == pytest.approx(0.3423, abs=1e-4)


@pytest.mark.slow
def test_quick_demo_over_two_seeds(tmp_path, capsys):
    """`--seeds 2`: one folder per seed, each exactly the single-seed run of that seed (its stages carry seed=S),
    and a report whose verdicts come from the two seeds, each seed's row in the details."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--seeds", "2", "seed=3", f"output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "== seed 3:" in printed and "== seed 4:" in printed and "seed=4" in printed
    for s in (3, 4):
        assert json.loads((out / f"seed-{s}" / "demo.json").read_text())["settings"]["seed"] == s
        assert (out / f"seed-{s}" / "report.md").is_file()
    report = (out / "report.md").read_text()
    assert "posttrain demo: arithmetic, 2 seeds" in report and "over 2 seeds (per seed:" in report
    assert "## Claims of the background paper" in report and "### seed 3" in report and "### seed 4" in report


def test_unknown_demo_task_is_rejected(tmp_path, capsys):
    assert main(["demo", "--task", "poetry", f"output_dir={tmp_path}"]) == 2
    assert "config key `task`: unknown value `poetry` (valid: arithmetic, sentiment)" in capsys.readouterr().err
    assert DemoConfig().force is False


def test_a_signal_during_a_training_stage_stops_the_whole_demo(tmp_path, capsys, monkeypatch):
    """SIGTERM reaches the stage's training loop (which saves a checkpoint and returns normally); the demo must not
    go on to the next stage. The stage is a stand-in that receives a real SIGTERM inside its own StopSignal."""
    import signal as sig

    import posttrain.cli
    from posttrain.engine.signals import StopSignal
    from posttrain.errors import TrainingError
    from posttrain.recipes.demo import run_stage

    ran = []

    def stage_main(argv):
        ran.append(argv[0])
        with StopSignal() as stop:
            os.kill(os.getpid(), sig.SIGTERM)
            assert stop.requested  # the handler ran: the loop would now save and return
        return 0

    monkeypatch.setattr(posttrain.cli, "main", stage_main)
    stage = pipeline("arithmetic", tmp_path)[2]  # sft
    with pytest.raises(TrainingError, match="demo stopped by SIGTERM during stage `sft`"):
        run_stage(stage, ["sft", "examples/demo/sft.yaml"], tmp_path, fresh_start=False)
    assert ran == ["sft"]
    ran.clear()
    monkeypatch.setattr(posttrain.cli, "main", lambda argv: ran.append(argv[0]) or 0)
    assert run_stage(stage, ["sft", "examples/demo/sft.yaml"], tmp_path, fresh_start=False) >= 0  # no stale flag
    assert ran == ["sft"]
