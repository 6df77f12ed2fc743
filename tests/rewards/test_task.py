"""TaskReward: a built-in verifier as a reward source, on hand-written cases."""

from __future__ import annotations

import pytest

from posttrain.config import ConfigError, RewardConfig
from posttrain.errors import RewardError
from posttrain.rewards import CombinedReward, TaskReward, build_reward


def test_arithmetic_verifier_cases():
    """What is 3 + 4 - 2? = 5: the right chain 1.0; a wrong answer 0.0; two answers (malformed) 0.0; empty 0.0.
    The message-list prompt passes its last user text, so it scores like the plain string."""
    reward = TaskReward("arithmetic")
    messages = [{"role": "system", "content": "show your steps"}, {"role": "user", "content": "What is 3 + 4 - 2?"}]
    prompts = [messages, "What is 3 + 4 - 2?", "What is 3 + 4 - 2?", "What is 3 + 4 - 2?"]
    completions = ["3 + 4 = 7. 7 - 2 = 5. The answer is 5.", "The answer is 6.", "The answer is 5. The answer is 6.", ""]
    assert reward(prompts, completions).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert reward.name == "task:arithmetic"


def test_task_and_function_combined(tmp_path):
    """reward.function gives len(completion) / 10, reward.task the verifier; weights [2, 1]:
    "The answer is 12." (17 chars) right: 2 * 1.7 + 1 = 4.4; "The answer is 13." wrong: 2 * 1.7 + 0 = 3.4."""
    path = tmp_path / "length.py"
    path.write_text("def tenth(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")
    source = build_reward(RewardConfig(function=f"{path}:tenth", task="arithmetic", weights=[2.0, 1.0]), device="cpu")
    assert isinstance(source, CombinedReward)
    scores = source(["What is 5 + 7?"] * 2, ["The answer is 12.", "The answer is 13."])
    assert scores.tolist() == pytest.approx([4.4, 3.4], abs=1e-6)


def test_unknown_task():
    with pytest.raises(ConfigError, match=r"reward\.task: unknown task `algebra`; built-in tasks: .*arithmetic"):
        TaskReward("algebra")


def test_verifier_error_reaches_caller():
    """A prompt the arithmetic verifier cannot parse is a RewardError, not a silent 0."""
    with pytest.raises(RewardError, match="arithmetic"):
        TaskReward("arithmetic")(["tell me a story"], ["The answer is 1."])
