"""The loop contract: `Steps` (cadence, resume, stop signal) and `BatchPlan` (which rows each rank takes)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from posttrain.engine import DistInfo
from posttrain.engine.loop import BatchPlan, LoopSettings, Steps
from posttrain.errors import RewardError


def rank(r: int, world: int) -> DistInfo:
    return DistInfo(rank=r, world_size=world, local_rank=r, device=torch.device("cpu"), is_main=r == 0)


ONE = rank(0, 1)


def test_steps_run_to_the_end_with_checkpoints_at_the_cadence_and_after_the_last():
    """The last step is checkpointed too: a finished run is resumable (extended with a larger max_steps)."""
    saved: list[int] = []
    steps = Steps(LoopSettings(total_steps=5, save_every=2, progress=False), ONE, checkpoint=saved.append)
    assert list(steps) == [1, 2, 3, 4, 5]
    assert saved == [2, 4, 5] and steps.step == 5 and not steps.stopped
    saved.clear()
    assert list(Steps(LoopSettings(total_steps=3, progress=False), ONE, checkpoint=saved.append)) == [1, 2, 3]
    assert saved == [3]  # save_every 0: only at the end


def test_a_reward_error_saves_the_last_completed_step_and_propagates():
    """A RewardError in step 4 (resumed at 1, cadence 10): checkpoint(3), the state step 4 started from; the error
    goes on to the caller. Other errors save nothing, and neither does a failure before any step since the resume."""
    saved: list[int] = []
    steps = Steps(LoopSettings(total_steps=10, start_step=1, save_every=10, progress=False), ONE, checkpoint=saved.append)
    with pytest.raises(RewardError, match="fn"), steps:
        for step in steps:
            if step == 4:
                raise RewardError("fn raised")
    assert saved == [3] and steps.step == 3
    for error, start in ((ValueError("x"), 0), (RewardError("fn"), 2)):
        saved.clear()
        steps = Steps(LoopSettings(total_steps=10, start_step=start, progress=False), ONE, checkpoint=saved.append)
        with pytest.raises(type(error)), steps:
            for step in steps:
                if step == 3:
                    raise error
        assert saved == []


def test_a_resumed_loop_starts_after_its_start_step():
    assert list(Steps(LoopSettings(total_steps=5, start_step=3, progress=False), ONE)) == [4, 5]
    assert list(Steps(LoopSettings(total_steps=5, start_step=5, progress=False), ONE)) == []


def test_a_signal_ends_the_loop_after_the_current_step_with_a_checkpoint():
    """SIGTERM during step 3 of 10: step 3 finishes, checkpoint(3) runs, no step 4; the process is not killed."""
    saved: list[int] = []
    steps = Steps(LoopSettings(total_steps=10, progress=False), ONE, checkpoint=saved.append)
    seen = []
    for step in steps:
        seen.append(step)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
    assert seen == [1, 2, 3] and saved == [3] and steps.stopped and steps.step == 3


def test_due_is_every_n_steps_and_the_last():
    steps = Steps(LoopSettings(total_steps=7, progress=False), ONE)
    assert [s for s in range(1, 8) if steps.due(3, s)] == [3, 6, 7]
    assert [s for s in range(1, 8) if steps.due(0, s)] == [7]


def test_two_ranks_with_half_the_batch_take_the_one_rank_rows_of_every_step():
    """20 items, global batch 8 (1 rank x 4 x 2 micro-batches, or 2 ranks x 2 x 2): in every step, rank 0's rows then
    rank 1's are the one-process step's rows, in order (step 3 is epoch 0's short last chunk of 4); epoch 1 (step 4)
    takes a new order."""
    items = list(range(20))
    one, two = BatchPlan(4, 2, steps_per_epoch=3, seed=5), BatchPlan(2, 2, steps_per_epoch=3, seed=5)
    flat = lambda groups: [x for g in groups for x in g]  # noqa: E731
    for step in (1, 2, 3, 4):
        whole = one.micro_batches(items, ONE, step)
        assert [len(g) for g in whole] == ([4] if step == 3 else [4, 4])
        assert flat(two.micro_batches(items, rank(0, 2), step)) + flat(two.micro_batches(items, rank(1, 2), step)) == flat(whole)
    assert sorted(flat(one.micro_batches(items, ONE, 1)) + flat(one.micro_batches(items, ONE, 2))
                  + flat(one.micro_batches(items, ONE, 3))) == items
    assert one.micro_batches(items, ONE, 4) != one.micro_batches(items, ONE, 1)
