"""Verdicts over seeds: the estimator (paired difference per seed, then mean +- SE over seeds against Student t),
the claims table and the multi-seed report, on seed folders written by the test."""

import json
import math

import pytest

from posttrain.config import DemoConfig
from posttrain.report.demo import METHODS, write_seeds_report
from posttrain.report.evidence import Effect, claims, combine, load_seed, t_critical


def test_over_seeds_the_verdict_uses_the_spread_of_the_per_seed_differences():
    """Differences 0.02, 0.04, 0.06: mean 0.04, sd 0.02, SE 0.02 / sqrt(3) = 0.01155; t(2 df) = 4.303, so the
    margin is 0.0497 > 0.04: within noise, though each seed's prompt-level SE (0.005) would call every seed a gain.
    Differences 0.05, 0.06, 0.07: mean 0.06, SE 0.00577, margin 0.0248: reproduced."""
    e = combine([(0.02, 0.005), (0.04, 0.005), (0.06, 0.005)])
    assert e.value == pytest.approx(0.04) and e.se == pytest.approx(0.02 / math.sqrt(3)) and e.t == 4.303
    assert e.verdict() == "within noise"
    assert combine([(0.05, 0.1), (0.06, 0.1), (0.07, 0.1)]).verdict() == "reproduced"
    assert combine([(-0.05, 0.1), (-0.06, 0.1), (-0.07, 0.1)]).verdict() == "not reproduced (the opposite)"
    assert combine([(-0.05, 0.1), (-0.06, 0.1), (-0.07, 0.1)]).verdict(sign=-1) == "reproduced"
    assert t_critical(4) == 2.776 and t_critical(100) == 1.96


def test_one_seed_uses_the_prompt_level_error_and_says_it_is_indicative():
    e = combine([(0.1, 0.03)])  # 0.1 > 2 x 0.03
    assert (e.se, e.t) == (0.03, 2.0) and e.verdict() == "reproduced (one seed: indicative)"
    assert Effect(0.1, 0.03, [0.1], 2.0, ["seed 0: zero-variance: ..."]).verdict() == "no verdict (degenerate evidence)"


def _eval(per_prompt, kl=0.5, reward=0.0):
    """A graded eval.json: per prompt two sample scores 0.05 either side of the prompt's value."""
    n = len(per_prompt)
    return {"measure": "sampled_gold_score", "sampled_gold_score": sum(per_prompt) / n, "kl": kl, "eos_rate": 1.0,
            "reward": reward, "num_prompts": n, "num_samples": 2,
            "samples": [{"prompt": f"p{i}", "sample_scores": [v - 0.05, v + 0.05]} for i, v in enumerate(per_prompt)]}


@pytest.fixture
def seeds(tmp_path):
    """Three seed folders. dpo: 0.5, 0.25, 0.5, 0.25 (mean 0.375) in every seed; ppo-verifier adds 0.20, 0.25, 0.30
    on every prompt but one (+0.1 there) so its differences vary: per seed (3 * g + 0.1) / 4 for g = 0.2, 0.25,
    0.3 = 0.175, 0.2125, 0.25. dpo's chosen log-ratio at the end: rewards/chosen -0.05, -0.04, -0.06 at beta 0.1."""
    folders = {}
    for s, (gain, chosen) in enumerate([(0.2, -0.05), (0.25, -0.04), (0.3, -0.06)]):
        f = tmp_path / f"seed-{s}"
        base = [0.5, 0.25, 0.5, 0.25]
        for name, ev in {"sft": _eval(base, kl=0.0, reward=0.1), "dpo": _eval(base, kl=0.4),
                         "ppo-verifier": _eval([v + gain for v in base[:3]] + [0.35]),
                         "ppo-rm": _eval([v - 0.1 for v in base[:3]] + [0.2 - 0.01 * s], reward=0.9)}.items():
            (f / name).mkdir(parents=True)
            (f / name / "eval.json").write_text(json.dumps(ev))
        (f / "dpo" / "metrics.jsonl").write_text(json.dumps({"step": 10, "rewards/chosen": chosen}) + "\n")
        (f / "dpo" / "config.yaml").write_text("beta: 0.1\n")
        (f / "demo.json").write_text(json.dumps({"settings": {}, "seconds": {"sft": 10.0, "dpo": 5.0}}))
        folders[s] = f
    return folders


def test_claims_from_seed_folders(seeds):
    loaded = [load_seed(s, f, METHODS) for s, f in seeds.items()]
    rows = {c[0]: c for c in claims(loaded, "sampled_gold_score", "mean gold score")}
    ppo_dpo = rows["PPO beats DPO on a verifiable task"]
    assert ppo_dpo[3].per_seed == pytest.approx([0.175, 0.2125, 0.25])
    assert ppo_dpo[5] == "reproduced"  # mean 0.2125, SE 0.0217, margin 0.093
    assert rows["Iterative online DPO beats offline DPO"][4:] == ("not run", "not measured")
    assert rows["PPO with advantage normalisation beats PPO without"][4] == "not run"
    # ppo-rm: gold -0.1 on three prompts and -0.05 - 0.01 s on the fourth; the RM score rose 0.1 -> 0.9
    over = rows["PPO on a learned reward model over-optimises it (proxy up, gold down)"]
    assert over[5] == "reproduced" and "reward-model score +0.80 ± 0.00" in over[4]
    mass = rows["DPO moves probability to responses outside the preference data"]
    assert mass[3].per_seed == pytest.approx([-0.5, -0.4, -0.6]) and mass[5] == "reproduced"


def test_the_multi_seed_report(seeds, tmp_path):
    path = write_seeds_report(DemoConfig(task="sentiment", seeds=3), tmp_path, seeds)
    text = path.read_text()
    assert text.index("## What this shows") < text.index("## Results over seeds") < text.index("## Claims")
    assert "**Improved on SFT:** ppo-verifier (+21.3 ± 2.2 points)" in text
    assert "- ppo-verifier: +21.3 ± 2.2 points over 3 seeds (per seed: +17.5, +21.3, +25.0; t = 4.30).\n" in text
    # dpo's evaluation equals SFT's on every prompt in every seed: named, and no verdict
    assert "**No verdict (degenerate evidence):** dpo." in text
    assert "(per seed: +0.0, +0.0, +0.0; t = 4.30): **no verdict**, eval-unchanged (seeds 0, 1, 2)." in text
    assert "| sft | 37.5% ± 0.0 | 37.5%, 37.5%, 37.5% |" in text
    assert text.count("### seed ") == 3 and "| 0 | 15 |" in text


def test_the_new_methods_claims_compare_against_their_papers_baselines(seeds):
    """kto / orpo / simpo against dpo and the GRPO rows against ppo-verifier / grpo: 'not run' until those runs exist,
    then judged like every claim. Seed 0 gets a kto run equal to dpo plus 0.25 on every prompt."""
    loaded = [load_seed(s, f, METHODS) for s, f in seeds.items()]
    rows = {c[0]: c for c in claims(loaded, "sampled_gold_score", "mean gold score")}
    for claim in ("KTO on the same preferences, unpaired, beats DPO", "ORPO beats DPO", "SimPO beats DPO",
                  "GRPO without a critic beats PPO with one", "DAPO beats GRPO", "Dr. GRPO beats GRPO"):
        assert rows[claim][4:] == ("not run", "not measured")
    (seeds[0] / "kto").mkdir()
    (seeds[0] / "kto" / "eval.json").write_text(json.dumps(_eval([0.75, 0.5, 0.75, 0.5])))
    loaded = [load_seed(s, f, METHODS) for s, f in seeds.items()]
    kto = {c[0]: c for c in claims(loaded, "sampled_gold_score", "mean gold score")}[
        "KTO on the same preferences, unpaired, beats DPO"]
    assert kto[2] == "kto − dpo, mean gold score" and kto[3].per_seed == pytest.approx([0.25])
