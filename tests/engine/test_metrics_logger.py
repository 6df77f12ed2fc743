"""metrics.jsonl, the progress bar, run set-up."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from posttrain.config import ConfigError, SFTConfig, load_config
from posttrain.engine import MetricsLogger, Progress, autocast_dtype, format_metrics, read_metrics, setup_run


def test_metrics_jsonl_lines_parse(tmp_path):
    with MetricsLogger(tmp_path, ["jsonl"], is_main=True) as log:
        log.log({"loss": torch.tensor(2.5), "learning_rate": 1e-5, "grad_norm": 0.75}, step=10, epoch=0.25)
        log.log({"eval_loss": 2.0, "accuracy": float("nan")}, step=20, epoch=0.5)
        # flushed at each write: readable while the run is still going
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 10, "epoch": 0.25, "loss": 2.5, "learning_rate": 1e-5, "grad_norm": 0.75},
        {"step": 20, "epoch": 0.5, "eval_loss": 2.0, "accuracy": None},
    ]
    with MetricsLogger(tmp_path, ["jsonl"], is_main=True) as log:  # a resumed run appends
        log.log({"loss": 1.0}, step=30)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]


def test_only_the_main_rank_writes(tmp_path):
    with MetricsLogger(tmp_path, ["jsonl"], is_main=False) as log:
        record = log.log({"loss": 1.0}, step=1)
    assert record == {"step": 1, "loss": 1.0}
    assert not (tmp_path / "metrics.jsonl").exists()


def test_reporters_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown \\['tensorbord'\\]"):
        MetricsLogger(tmp_path, ["jsonl", "tensorbord"])
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ConfigError, match=r"pip install posttrain\[tensorboard\]"):
            MetricsLogger(tmp_path, ["tensorboard"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"pip install posttrain\[wandb\]"):
            MetricsLogger(tmp_path, ["wandb"])


def test_format_and_progress(capsys):
    assert format_metrics({"loss": 1.23456, "learning_rate": 2e-5, "step": 3}) == "loss 1.235 | learning_rate 2.000e-05 | step 3"
    with Progress(total=3, desc="sft", enabled=True) as bar:
        for _ in range(3):
            bar.update(loss=torch.tensor(0.5))
    err = capsys.readouterr().err
    assert "sft" in err and "3/3" in err and "loss=0.5" in err


def test_setup_run_writes_the_resolved_config_and_seeds(tmp_path, monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(SFTConfig, overrides=[f"output_dir={tmp_path / 'run'}", "seed=3", "learning_rate=1e-4"])
    ctx = setup_run(cfg, "sft")
    first = torch.rand(3)
    ctx.logger.log({"loss": 1.0}, step=1)
    ctx.close()
    assert ctx.dist.world_size == 1 and ctx.dist.is_main and ctx.device == torch.device("cpu")
    assert load_config(SFTConfig, ctx.output_dir / "config.yaml") == cfg
    assert read_metrics(ctx.output_dir) == [{"step": 1, "loss": 1.0}]
    assert ctx.checkpointer.keep == cfg.save.keep
    setup_run(cfg, "sft").close()
    assert torch.equal(torch.rand(3), first)
    assert autocast_dtype(cfg, torch.device("cpu")) is None
