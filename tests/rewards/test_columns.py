"""Rewards that see the data: row columns, completion_ids and step as keyword arguments (TRL's convention), several
functions with weights and per-function stats, and every way a call can go wrong named by function and row."""

from __future__ import annotations

import textwrap
import threading
import time

import pytest
import torch

from posttrain.config import RewardConfig, load_config, PPOConfig
from posttrain.engine.dist import RolloutShare
from posttrain.errors import RewardError
from posttrain.recipes.prompts import reward_part_stats
from posttrain.rewards import FunctionReward, build_reward, reward_names, row_columns, score_parts

FUNCS = textwrap.dedent(
    '''
    import time

    def exact(completions, answer, **kwargs):
        """TRL style: completions and a column by keyword."""
        return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

    def sees_all(prompts, completions, **kwargs):
        return [len(kwargs["completion_ids"][i]) + kwargs["step"] + (kwargs["bonus"][i] or 0) for i in range(len(completions))]

    def old_style(p, c):
        return [float(len(x)) for x in c]

    def named_only(prompts, completions, step):
        return [float(step)] * len(completions)

    def needs_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    def returns_none(completions, **kwargs):
        return [None if c == "b" else 1.0 for c in completions]

    def spins(completions, **kwargs):
        if "slow" in completions:
            while True:
                pass
        return [0.0] * len(completions)

    def sleeps(completions, **kwargs):
        if "slow" in completions:
            time.sleep(60)
        return [0.0] * len(completions)
    '''
)

PROMPTS = ["What is 1 + 1?", "What is 2 + 3?", "What is 4 - 4?"]
COMPS = ["2", "6", "0"]
COLUMNS = {"answer": [2, 5, 0], "bonus": [10, None, 0]}


@pytest.fixture
def funcs(tmp_path):
    path = tmp_path / "fns.py"
    path.write_text(FUNCS)
    return path


def test_row_columns_aligns_rows_and_fills_missing_with_none():
    assert row_columns([{"answer": 1}, {"answer": 2, "kind": "x"}]) == {"answer": [1, 2], "kind": [None, "x"]}


def test_a_trl_style_function_reads_a_column(funcs):
    """exact: "2" == 2, "6" != 5, "0" == 0 -> (1, 0, 1)."""
    scores = FunctionReward(f"{funcs}:exact")(PROMPTS, COMPS, columns=COLUMNS)
    assert scores.tolist() == [1.0, 0.0, 1.0]


def test_kwargs_carry_columns_completion_ids_and_step(funcs):
    """sees_all = len(completion_ids) + step + bonus (None -> 0): ids of lengths (1, 2, 3), step 7, bonus (10, -, 0)
    -> (1 + 7 + 10, 2 + 7, 3 + 7) = (18, 9, 10)."""
    fn = FunctionReward(f"{funcs}:sees_all")
    scores = fn(PROMPTS, COMPS, columns=COLUMNS, completion_ids=[[5], [5, 6], [5, 6, 7]], step=7)
    assert scores.tolist() == [18.0, 9.0, 10.0]


def test_old_and_named_signatures_get_only_what_they_take(funcs):
    """old_style(p, c) gets no keywords (it would fail on any); named_only gets step and nothing else."""
    assert FunctionReward(f"{funcs}:old_style")(PROMPTS, COMPS, columns=COLUMNS, step=3).tolist() == [1.0, 1.0, 1.0]
    assert FunctionReward(f"{funcs}:named_only")(PROMPTS, COMPS, columns=COLUMNS, step=3).tolist() == [3.0] * 3


def test_a_missing_column_or_a_reserved_name_is_named(funcs):
    with pytest.raises(RewardError, match=r"needs `solution`, which the prompt rows do not have \(their other columns: answer, bonus\)"):
        FunctionReward(f"{funcs}:needs_solution")(PROMPTS, COMPS, columns=COLUMNS)
    with pytest.raises(RewardError, match="column `step`, which is also an argument the call fills"):
        FunctionReward(f"{funcs}:exact")(PROMPTS, COMPS, columns={**COLUMNS, "step": [1, 2, 3]})


def test_none_is_refused_naming_the_row(funcs):
    with pytest.raises(RewardError, match=r"returns_none returned a non-number None .* at row 1 \(prompt 'What is 2 \+ 3\?', completion 'b'\)"):
        FunctionReward(f"{funcs}:returns_none")(PROMPTS, ["a", "b", "c"])


@pytest.mark.parametrize("fn", ["spins", "sleeps"])
def test_a_hang_is_stopped_after_the_timeout_naming_the_row(funcs, fn):
    """A busy loop and a sleep on row 1 ("slow"): the batch times out after 0.3 s, then rows one at a time find row
    1 (row 0 returns at once): about two timeouts in all, far below the 60 s sleep."""
    reward = FunctionReward(f"{funcs}:{fn}", timeout=0.3)
    start = time.perf_counter()
    with pytest.raises(RewardError, match=rf"{fn} did not return within reward.timeout = 0.3 s \(at row 1 .*'slow'"):
        reward(PROMPTS, ["fast", "slow", "fast"])
    assert time.perf_counter() - start < 5
    assert reward(PROMPTS, ["fast"] * 3).tolist() == [0.0] * 3  # the handler is gone: later calls are normal


def test_the_timeout_also_works_off_the_main_thread(funcs):
    """Off the main thread no signal can be used: the call runs in a daemon thread that is abandoned."""
    reward, out = FunctionReward(f"{funcs}:sleeps", timeout=0.3), {}

    def run():
        try:
            reward(PROMPTS, ["slow", "fast", "fast"])
        except RewardError as e:
            out["error"] = str(e)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(10)
    assert "did not return within reward.timeout = 0.3 s (at row 0" in out["error"]


def test_a_module_function_loads_by_its_dotted_name():
    reward = FunctionReward("posttrain.rewards.verifiers:boxed_format")
    assert reward.name == "posttrain.rewards.verifiers:boxed_format" and reward.log_name == "boxed_format"
    assert reward(["q", "q"], ["so \\boxed{3}.", "3"]).tolist() == [1.0, 0.0]


def test_several_functions_weighted_and_logged_each(funcs, tmp_path):
    """function: [exact, old_style], weights (2, 0.5): exact (1, 0, 1), old_style len (1, 1, 1)
    -> total (2.5, 0.5, 2.5). Logged each: exact mean 2/3, sample std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = 0.57735;
    old_style mean 1, std 0."""
    cfg = load_config(PPOConfig, overrides=[f"reward.function=[{funcs}:exact,{funcs}:old_style]", "reward.weights=[2,0.5]"])
    assert cfg.reward.function == [f"{funcs}:exact", f"{funcs}:old_style"]
    reward = build_reward(cfg.reward)
    total, parts = score_parts(reward, PROMPTS, COMPS, columns=COLUMNS)
    assert total.tolist() == [2.5, 0.5, 2.5] and reward(PROMPTS, COMPS, columns=COLUMNS).tolist() == [2.5, 0.5, 2.5]
    assert reward_names(reward) == ["exact", "old_style"] and parts["exact"].tolist() == [1.0, 0.0, 1.0]
    stats = reward_part_stats(parts, reward_names(reward), RolloutShare(3, 1, None))
    assert stats["rewards/exact/mean"] == pytest.approx(2 / 3) and stats["rewards/exact/std"] == pytest.approx(0.57735, abs=1e-5)
    assert stats["rewards/old_style/mean"] == 1.0 and stats["rewards/old_style/std"] == 0.0
    # a clipped single source still reports its own, unclipped scores; a rank with no rows reports zeros
    clipped = build_reward(RewardConfig(function=[f"{funcs}:old_style"], clip=0.5))
    total, parts = score_parts(clipped, PROMPTS, COMPS)
    assert total.tolist() == [0.5] * 3 and parts["old_style"].tolist() == [1.0] * 3
    assert reward_part_stats({}, ["old_style"], RolloutShare(3, 1, None)) == {"rewards/old_style/mean": 0.0,
                                                                             "rewards/old_style/std": 0.0}


def test_two_functions_of_one_name_log_under_their_full_names(funcs, tmp_path):
    other = tmp_path / "other.py"
    other.write_text("def exact(completions, **kwargs):\n    return [0.5] * len(completions)\n")
    reward = build_reward(RewardConfig(function=[f"{funcs}:exact", f"{other}:exact"]))
    assert reward_names(reward) == [f"{funcs}:exact", f"{other}:exact"]
    assert reward(PROMPTS, COMPS, columns=COLUMNS).tolist() == [1.5, 0.5, 1.5]


def test_a_negative_timeout_is_refused(funcs):
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match="reward.timeout"):
        build_reward(RewardConfig(function=f"{funcs}:exact", timeout=-1))
    assert isinstance(build_reward(RewardConfig(function=f"{funcs}:exact", timeout=0))(PROMPTS, COMPS, columns=COLUMNS),
                      torch.Tensor)
