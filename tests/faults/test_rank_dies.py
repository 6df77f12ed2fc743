"""A rank dies in a 2-process run: rank 1 is SIGKILLed mid-run under `--nproc 2`; the surviving rank exits within a
bounded time with an error naming the lost rank (never hangs), and the job restarted on 2 processes resumes from the
last checkpoint and finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import sft_args

pytestmark = pytest.mark.slow

BOUND = 60  # seconds from the kill to the whole job's exit


def _launch(args: list[str]) -> subprocess.Popen:
    """`posttrain ARGS --nproc 2` in its own session (so a failed test can end the whole tree)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "posttrain", *args, "--nproc", "2"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def _children(pid: int) -> list[int]:
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(d))
    return kids


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker process of `rank` under `launcher` (torchrun sets RANK in its workers' environment)."""
    todo = [launcher]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
        todo += _children(pid)
    return None


def _kill_rank_1_after(proc: subprocess.Popen, checkpoint: Path) -> tuple[float, str, str]:
    """SIGKILL rank 1 once `checkpoint` exists; (seconds from the kill to the job's exit, stdout, stderr)."""
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.is_dir():
            assert proc.poll() is None, "the run ended before the kill: " + proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, f"no {checkpoint} after 300 s"
            time.sleep(0.05)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=BOUND + 60)
        return time.monotonic() - killed, out, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _assert_died_then_resumes(args: list[str], out: Path, checkpoint: str) -> str:
    """Kill rank 1 once `checkpoint` is saved: the job stops within BOUND seconds, rank 0 naming rank 1 as lost;
    the restarted 2-process job resumes from a checkpoint at or after `checkpoint` and finishes (final/ written).
    Returns the resumed run's stdout."""
    seconds, _, err = _kill_rank_1_after(_launch(args), out / "checkpoints" / checkpoint)
    print(f"{args[0]}: the job exited {seconds:.1f} s after rank 1 was killed")
    assert seconds < BOUND, err[-3000:]
    assert "rank 0: lost rank 1 (pid" in err and "resume=auto" in err, err[-3000:]
    assert not (out / "final").exists()
    proc = _launch(args)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    resumed = [line for line in stdout.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, stdout[-2000:]  # rank 0 says it
    step = int(resumed[0].split("step-")[1].split()[0].rstrip(":,)"))
    assert step >= int(checkpoint.split("-")[1]), resumed[0]
    assert (out / "final" / "model.safetensors").is_file()
    return stdout


def test_sft_rank_1_killed(tiny_model, arith_dir, tmp_path):
    out = tmp_path / "sft"
    _assert_died_then_resumes(sft_args(tiny_model, arith_dir / "sft.jsonl", out, "max_steps=10", "batch_size=4"),
                              out, "step-3")


def test_dpo_rank_1_killed(tiny_model, arith_dir, tmp_path):
    out = tmp_path / "dpo"
    args = ["dpo", f"model={tiny_model}", f"data.train={arith_dir / 'prefs.jsonl'}", f"output_dir={out}",
            "data.max_rows=64", "batch_size=4", "max_length=64", "max_steps=10", "learning_rate=1e-3",
            "save.steps=1", "logging.progress=false", "logging.steps=1"]
    _assert_died_then_resumes(args, out, "step-3")


def test_ppo_rank_1_killed(tiny_model, arith_dir, tmp_path):
    out = tmp_path / "ppo"
    args = ["ppo", f"model={tiny_model}", f"prompts={arith_dir / 'prompts.jsonl'}", f"output_dir={out}",
            "reward.task=arithmetic", "rollout.batch_size=8", "rollout.max_new_tokens=8", "total_episodes=48",
            "mini_batch_size=4", "batch_size=2", "ppo_epochs=1", "learning_rate=1e-3", "save.steps=1",
            "logging.progress=false"]
    _assert_died_then_resumes(args, out, "step-2")
