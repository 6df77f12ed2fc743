"""FunctionReward: a user's file:fn loaded from its path, and every way its output can be wrong."""

from __future__ import annotations

import textwrap

import pytest
import torch

from posttrain.config import ConfigError
from posttrain.errors import RewardError
from posttrain.rewards import FunctionReward

FUNCS = textwrap.dedent(
    '''
    import math

    def length_bonus(prompts, completions):
        return [len(c) + 0.5 * len(p) for p, c in zip(prompts, completions)]

    def raises_on_bad(prompts, completions):
        return [1.0 / (0 if c == "bad" else 1) for c in completions]

    def batch_only(prompts, completions):
        if len(completions) > 1:
            raise RuntimeError("no batches")
        return [1.0]

    def short(prompts, completions):
        return [1.0] * (len(completions) - 1)

    def nan_second(prompts, completions):
        return [0.0, math.nan, 1.0][: len(completions)]

    def string_third(prompts, completions):
        return [0.0, 1.0, "high"][: len(completions)]

    def not_a_list(prompts, completions):
        return 3.0

    def booleans(prompts, completions):
        return [c == "yes" for c in completions]
    '''
)

PROMPTS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}],
    "abcd",
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "q"}],
]
COMPLETIONS = ["one", "bad", "three!"]


@pytest.fixture
def funcs(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(FUNCS)
    return path


def test_good_function_gets_last_user_text(funcs):
    """length_bonus = len(completion) + 0.5 * len(last user text):
    "one" + "ab" -> 3 + 1 = 4; "bad" + "abcd" -> 3 + 2 = 5; "three!" + "q" -> 6 + 0.5 = 6.5."""
    reward = FunctionReward(f"{funcs}:length_bonus")
    scores = reward(PROMPTS, COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert scores.tolist() == [4.0, 5.0, 6.5]
    assert reward.name == f"{funcs}:length_bonus"


def test_booleans_count_as_zero_one(funcs):
    assert FunctionReward(f"{funcs}:booleans")(["p", "p"], ["yes", "no"]).tolist() == [1.0, 0.0]


def test_raising_function_names_file_fn_and_item(funcs):
    """Row 1 ("bad") divides by zero; calling one row at a time finds it, named with its prompt and completion."""
    with pytest.raises(RewardError) as e:
        FunctionReward(f"{funcs}:raises_on_bad")(PROMPTS, COMPLETIONS)
    msg = str(e.value)
    assert f"{funcs}:raises_on_bad" in msg and "ZeroDivisionError" in msg and "row 1 (prompt 'abcd', completion 'bad')" in msg


def test_raising_only_on_batches_says_so(funcs):
    with pytest.raises(RewardError, match=r"batch_only raised RuntimeError: no batches \(on the batch of 3"):
        FunctionReward(f"{funcs}:batch_only")(PROMPTS, COMPLETIONS)


def test_wrong_length(funcs):
    with pytest.raises(RewardError, match=r"my_rewards\.py:short returned 2 values for 3 completions"):
        FunctionReward(f"{funcs}:short")(PROMPTS, COMPLETIONS)


def test_nan_names_item_and_value(funcs):
    with pytest.raises(RewardError) as e:
        FunctionReward(f"{funcs}:nan_second")(PROMPTS, COMPLETIONS)
    msg = str(e.value)
    assert f"{funcs}:nan_second" in msg and "non-finite value nan at row 1 (prompt 'abcd', completion 'bad')" in msg


def test_non_number_names_item_and_value(funcs):
    with pytest.raises(RewardError) as e:
        FunctionReward(f"{funcs}:string_third")(PROMPTS, COMPLETIONS)
    msg = str(e.value)
    assert f"{funcs}:string_third" in msg and "non-number 'high' (str) at row 2 (prompt 'q', completion 'three!')" in msg


def test_not_a_list(funcs):
    with pytest.raises(RewardError, match=r"not_a_list returned float 3\.0; expected a list of 3 floats"):
        FunctionReward(f"{funcs}:not_a_list")(PROMPTS, COMPLETIONS)


def test_bad_specs(funcs, tmp_path):
    with pytest.raises(ConfigError, match="reward.function: file not found"):
        FunctionReward(f"{tmp_path}/missing.py:fn")
    with pytest.raises(ConfigError, match="has no function `nope`; it defines: .*length_bonus"):
        FunctionReward(f"{funcs}:nope")
    with pytest.raises(ConfigError, match="expected `path/to/file.py:function_name`"):
        FunctionReward(str(funcs))


def test_import_error_names_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import not_a_module_anywhere\n")
    with pytest.raises(RewardError, match=r"broken\.py failed to import: ModuleNotFoundError"):
        FunctionReward(f"{path}:fn")


def test_sibling_import(tmp_path):
    """The user's file may import a helper next to it: 2 * len("abc") = 6."""
    (tmp_path / "helper_for_reward.py").write_text("def double(x):\n    return 2 * x\n")
    path = tmp_path / "uses_helper.py"
    path.write_text("from helper_for_reward import double\n\ndef fn(prompts, completions):\n    return [double(len(c)) for c in completions]\n")
    assert FunctionReward(f"{path}:fn")(["p"], ["abc"]).tolist() == [6.0]
