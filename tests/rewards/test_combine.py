"""CombinedReward weights, clipping, build_reward from a RewardConfig, and prompt_text."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ConfigError, RewardConfig
from posttrain.errors import RewardError
from posttrain.rewards import ClippedReward, CombinedReward, FunctionReward, build_reward, prompt_text


@pytest.fixture
def files(tmp_path):
    path = tmp_path / "fns.py"
    path.write_text(
        "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n\n"
        "def minus_one(prompts, completions):\n    return [-1.0] * len(completions)\n"
    )
    return path


def test_prompt_text():
    assert prompt_text("hi") == "hi"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert prompt_text(msgs) == "c"
    assert prompt_text(msgs[:2]) == "a"
    assert prompt_text([{"role": "system", "content": "s"}]) == ""


def test_combined_weights_by_hand(files):
    """Completions "ab", "abcde": length = [2, 5], minus_one = [-1, -1].
    0.5 * [2, 5] + 3 * [-1, -1] = [1 - 3, 2.5 - 3] = [-2, -0.5]."""
    length = FunctionReward(f"{files}:length")
    minus = FunctionReward(f"{files}:minus_one")
    combined = CombinedReward([(length, 0.5), (minus, 3.0)])
    assert combined(["p", "q"], ["ab", "abcde"]).tolist() == [-2.0, -0.5]
    parts = combined.parts(["p", "q"], ["ab", "abcde"])
    assert parts["length"].tolist() == [2.0, 5.0] and parts["minus_one"].tolist() == [-1.0, -1.0]
    assert combined.name == f"0.5*{length.name} + 3*{minus.name}"


def test_clipping(files):
    """length of "", "abc", "abcdefg" = [0, 3, 7], clipped to [-4, 4] -> [0, 3, 4]; minus_one -> -1 within."""
    clipped = ClippedReward(FunctionReward(f"{files}:length"), 4.0)
    assert clipped(["p"] * 3, ["", "abc", "abcdefg"]).tolist() == [0.0, 3.0, 4.0]
    assert ClippedReward(FunctionReward(f"{files}:minus_one"), 0.5)(["p"], ["x"]).tolist() == [-0.5]


def test_mismatched_batch(files):
    with pytest.raises(RewardError, match="2 prompts but 1 completions"):
        FunctionReward(f"{files}:length")(["a", "b"], ["x"])


def test_build_single_and_weighted(files):
    one = build_reward(RewardConfig(function=f"{files}:length"), device="cpu")
    assert isinstance(one, FunctionReward)
    scaled = build_reward(RewardConfig(function=f"{files}:length", weights=[2.0]), device="cpu")
    assert scaled(["p"], ["abc"]).tolist() == [6.0]


def test_build_clip_after_combining(files):
    """Only one function source here, so combine through a weight: 2 * len("abcdef") = 12 -> clip 5 -> 5;
    2 * len("ab") = 4 stays 4. Clipping after the weight, not before (5 * 2 would be 10)."""
    source = build_reward(RewardConfig(function=f"{files}:length", weights=[2.0], clip=5.0), device="cpu")
    assert isinstance(source, ClippedReward)
    assert source(["p", "p"], ["abcdef", "ab"]).tolist() == [5.0, 4.0]


def test_build_errors(files):
    with pytest.raises(ConfigError, match=r"reward\.model / reward\.function / reward\.task"):
        build_reward(RewardConfig(), device="cpu")
    with pytest.raises(ConfigError, match=r"reward\.weights has 2 values for 1 sources"):
        build_reward(RewardConfig(function=f"{files}:length", weights=[1.0, 2.0]), device="cpu")
    with pytest.raises(ConfigError, match=r"reward\.clip must be >= 0"):
        build_reward(RewardConfig(function=f"{files}:length", clip=-1.0), device="cpu")


def test_scores_are_float32_cpu(files):
    out = build_reward(RewardConfig(function=f"{files}:length"), device="cpu")(["p"], ["ab"])
    assert out.dtype == torch.float32 and out.shape == (1,)
