"""Verified checkpoints: a damaged newest checkpoint is skipped by resume=auto and refused by name; a finished run
extends; a run with other data or other settings is refused unless resume_force; a full disk stops a save cleanly."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
from helpers import same_weights, sft_args

from posttrain.cli import main
from posttrain.engine.checkpoint import verify_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_model, arith_dir, tmp_path_factory):
    """The uninterrupted 6-step run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(sft_args(tiny_model, arith_dir / "sft.jsonl", out)) == 0
    return out


def test_a_truncated_newest_checkpoint_is_skipped_by_auto_and_refused_by_path(tiny_model, arith_dir, reference,
                                                                            tmp_path, capsys):
    """Truncate step-6's model.safetensors (a partial copy): resume=step-6 fails naming that file; resume=auto says
    it skips step-6 and why, resumes from step-5 and ends on the uninterrupted run's weights bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    weights = out / "checkpoints" / "step-6" / "model.safetensors"
    os.unlink(weights)  # final/ shares this file by hard link: damage a copy, as a copy tool would
    shutil.copyfile(reference / "final" / "model.safetensors", weights)
    with open(weights, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    capsys.readouterr()
    args = sft_args(tiny_model, arith_dir / "sft.jsonl", out)
    assert main([*args, f"resume={weights.parent}"]) == 2
    assert f"{weights}: " in capsys.readouterr().err
    assert main(args) == 0
    text = capsys.readouterr()
    assert f"skipping {weights.parent}: {weights}" in text.err and "truncated" in text.err
    assert f"resumed from {out / 'checkpoints' / 'step-5'} at step 5" in text.out
    assert same_weights(out / "final" / "model.safetensors", reference / "final" / "model.safetensors")


def test_a_finished_run_extends_from_its_end(tiny_model, arith_dir, reference, tmp_path, capsys):
    """max_steps=4 then max_steps=6 resume=auto continues at step 4 (not an older checkpoint) and equals the
    6-step run; the last checkpoint and final/ hold one copy of the weights (a hard link)."""
    out = tmp_path / "run"
    args = sft_args(tiny_model, arith_dir / "sft.jsonl", out)
    assert main([*args, "max_steps=4", "save.steps=3"]) == 0
    last = out / "checkpoints" / "step-4"
    assert os.path.samefile(last / "model.safetensors", out / "final" / "model.safetensors")
    assert verify_checkpoint(last) is None
    capsys.readouterr()
    assert main([*args, "max_steps=6", "logging.steps=2"]) == 0  # neither the length nor the cadence trips it
    assert f"resumed from {last} at step 4" in capsys.readouterr().out
    assert same_weights(out / "final" / "model.safetensors", reference / "final" / "model.safetensors")


def test_changed_inputs_are_refused_by_name_unless_forced(tiny_model, arith_dir, reference, tmp_path, capsys):
    """Resuming the finished run with another learning_rate, or with a data file of other contents, is refused
    with the difference printed; resume_force=true goes on and prints it; a moved copy of the same data is fine."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    data = tmp_path / "other.jsonl"
    rows = (arith_dir / "sft.jsonl").read_text().splitlines()
    data.write_text("\n".join(rows[1:]) + "\n")
    same = tmp_path / "moved.jsonl"
    shutil.copyfile(arith_dir / "sft.jsonl", same)
    capsys.readouterr()
    assert main([*sft_args(tiny_model, arith_dir / "sft.jsonl", out), "learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.003 -> 0.001" in err and "resume_force=true" in err
    assert main(sft_args(tiny_model, data, out)) == 2
    assert "training data" in capsys.readouterr().err
    assert main([*sft_args(tiny_model, data, out), "resume_force=true"]) == 0
    assert "resume_force: resuming" in capsys.readouterr().out
    assert main(sft_args(tiny_model, same, out)) == 0  # the same contents at another path: the same run


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: a write gets EFBIG
    return apply


def test_a_full_disk_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model, arith_dir, tmp_path):
    """A 2-step run, then resumed towards step 4 with no file allowed past 1 MB (the optimizer state is larger):
    the save of step 3 fails, the run stops with an error naming the full disk and the kept checkpoint, step-2
    still verifies, and no half-written folder is left."""
    out = tmp_path / "run"
    args = sft_args(tiny_model, arith_dir / "sft.jsonl", out)
    assert main([*args, "max_steps=2"]) == 0
    proc = subprocess.run([sys.executable, "-m", "posttrain", *args, "max_steps=4"], capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size(1 << 20))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "saving checkpoint" in proc.stderr and "File too large" in proc.stderr, proc.stderr[-2000:]
    assert "is full" in proc.stderr and "step-2 is kept" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert verify_checkpoint(out / "checkpoints" / "step-2") is None
    assert json.loads((out / "checkpoints" / "step-2" / "manifest.json").read_text())["step"] == 2
