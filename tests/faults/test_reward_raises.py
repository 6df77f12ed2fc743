"""A reward function that raises at the 2nd iteration of a PPO / GRPO run: the run stops naming the function and the
row, a checkpoint of iteration 1 exists and verifies, and `resume=auto` with the function fixed continues to the
weights of a run that had the fixed function from the start."""

from __future__ import annotations

import pytest
from helpers import same_weights

from posttrain.cli import main
from posttrain.engine.checkpoint import list_checkpoints, verify_checkpoint

# `step` is the rollout's 0-based index: iteration 2 scores with step 1. ZeroDivisionError on every row of it.
BROKEN = """def score(prompts, completions, step, **kwargs):
    return [len(c) / (1 - step) for c in completions]
"""
FIXED = """def score(prompts, completions, step, **kwargs):
    return [len(c) / (1 + step) for c in completions]
"""


def _args(recipe: str, model, arith_dir, out, function) -> list[str]:
    common = [f"model={model}", f"prompts={arith_dir / 'prompts.jsonl'}", f"output_dir={out}",
              f"reward.function={function}:score", "rollout.batch_size=8", "rollout.max_new_tokens=8",
              "total_episodes=24", "batch_size=4", "learning_rate=1e-3", "logging.progress=false"]
    if recipe == "ppo":
        return ["ppo", *common, "mini_batch_size=4", "ppo_epochs=1"]
    return ["grpo", *common, "num_generations=4"]


@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_reward_raising_at_iteration_2_saves_iteration_1_and_resumes_when_fixed(recipe, tiny_model, arith_dir,
                                                                                tmp_path, capsys):
    """3 iterations of 8 rollouts, no regular checkpoints (save.steps=0): the reward error alone writes step-1."""
    function, out, ref = tmp_path / "reward.py", tmp_path / "run", tmp_path / "ref"
    function.write_text(BROKEN)
    assert main(_args(recipe, tiny_model, arith_dir, out, function)) == 2
    said = capsys.readouterr()
    assert f"reward function {function}:score raised ZeroDivisionError" in said.err, said.err
    assert "at row 0 (prompt '" in said.err, said.err
    unit = "iteration" if recipe == "ppo" else "generation"
    assert f"reward error in {unit} 2: saved checkpoint at {unit} 1" in said.out, said.out
    saved = list_checkpoints(out / "checkpoints")
    assert [step for step, _ in saved] == [1] and verify_checkpoint(saved[0][1]) is None
    assert not (out / "final").exists()

    function.write_text(FIXED)
    assert main(_args(recipe, tiny_model, arith_dir, out, function)) == 0  # resume=auto is the default
    assert "resumed from" in capsys.readouterr().out
    assert main(_args(recipe, tiny_model, arith_dir, ref, function)) == 0
    assert same_weights(out / "final" / "model.safetensors", ref / "final" / "model.safetensors")
