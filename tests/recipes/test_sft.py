"""`posttrain sft` end to end on the embedded default: it learns, resumes exactly, packs exactly, fails clearly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from posttrain.cli import main
from posttrain.engine import read_metrics


def sft_args(tiny_model, arith_dir, out, *extra):
    return ["sft", f"model={tiny_model}", f"data.train={arith_dir / 'sft.jsonl'}", f"output_dir={out}",
            "data.eval_split=0.1", "batch_size=16", "learning_rate=3e-3", "max_length=64",
            "logging.progress=false", *extra]


def evals(out):
    return [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]


def test_sft_lowers_eval_loss_and_saves_a_loadable_model(tiny_model, arith_dir, tmp_path):
    out = tmp_path / "run"
    assert main(sft_args(tiny_model, arith_dir, out, "max_steps=30", "logging.eval_steps=30")) == 0
    first, last = evals(out)[0], evals(out)[-1]
    assert first["step"] == 0 and last["step"] == 30
    # untrained: ~log(vocab) = 6.2 nats per token; after 30 steps the answer format is learned
    assert last["eval_loss"] < 0.6 * first["eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.pad_token_id != tok.eos_token_id and model.config.vocab_size >= len(tok)
    assert (out / "config.yaml").is_file()


def test_classification_head_learns_sentiment(tiny_model, senti_dir, tmp_path):
    """Seed, "SFT": new random head + the top 2 blocks trained, the rest frozen. Majority class is ~0.5."""
    out = tmp_path / "cls"
    args = ["sft", f"model={tiny_model}", "task=classification", f"data.train={senti_dir / 'classify.jsonl'}",
            "data.eval_split=0.15", f"output_dir={out}", "freeze.trainable_layers=2", "max_steps=60",
            "batch_size=32", "learning_rate=3e-3", "logging.eval_steps=60", "logging.progress=false"]
    assert main(args) == 0
    final = evals(out)[-1]
    assert final["eval_accuracy"] > 0.75 and final["eval_macro_f1"] > 0.7
    clf = AutoModelForSequenceClassification.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert set(clf.config.id2label.values()) == {"negative", "positive"}
    batch = tok(["the film was great and the acting was superb ."], return_tensors="pt")
    label = clf.config.id2label[int(clf(**batch).logits.argmax(-1))]
    assert label in ("negative", "positive")


def test_frozen_layers_do_not_move(tiny_model, arith_dir, tmp_path):
    out = tmp_path / "frozen"
    assert main(sft_args(tiny_model, arith_dir, out, "max_steps=3", "freeze.trainable_layers=1",
                         "freeze.extra=[norm]")) == 0
    before, after = load_file(tiny_model / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("model.layers.3.") or k == "model.norm.weight" for k in moved)


def test_packing_gives_the_padded_loss(tiny_model, arith_dir, tmp_path):
    """Same rows, one step: the logged loss (global token mean) is the same packed or padded."""
    losses = []
    for packing in ("false", "true"):
        out = tmp_path / f"pack-{packing}"
        assert main(sft_args(tiny_model, arith_dir, out, "max_steps=2", "logging.steps=1", f"packing={packing}",
                             "max_length=128")) == 0
        losses.append([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_lora_writes_adapter_and_merged_model(tiny_model, arith_dir, tmp_path):
    out = tmp_path / "lora"
    assert main(sft_args(tiny_model, arith_dir, out, "max_steps=2", "lora.r=4", "save.merge_lora=true")) == 0
    assert (out / "final" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "final" / "merged")
    assert merged.config.vocab_size > 0


def test_bad_row_names_file_row_and_field(tiny_model, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    code = main(["sft", f"model={tiny_model}", f"data.train={data}", f"output_dir={tmp_path / 'o'}", "max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and "row 2" in err and "role" in err
    assert not (tmp_path / "o" / "final").exists()
    # skipped and counted instead when asked
    assert main(["sft", f"model={tiny_model}", f"data.train={data}", f"output_dir={tmp_path / 'o'}", "max_steps=1",
                 "data.skip_invalid=true", "logging.progress=false"]) == 0
    summary = read_metrics(tmp_path / "o" / "metrics.jsonl")[0]
    assert summary["data/skipped"] == 1 and summary["data/examples"] == 1


def _run_cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "posttrain", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_then_resume_equals_uninterrupted(tiny_model, arith_dir, tmp_path):
    """Stop a run with SIGTERM mid-way, resume it with resume=auto: the final weights are bit-identical."""
    base = ["max_steps=12", "logging.steps=1", "batch_size=8", "data.eval_split=0", "lr_scheduler=cosine",
            "warmup_ratio=0.2"]
    full = tmp_path / "full"
    assert main(sft_args(tiny_model, arith_dir, full, *base)) == 0

    cut = tmp_path / "cut"
    proc = _run_cli(sft_args(tiny_model, arith_dir, cut, *base))
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = read_metrics(cut / "metrics.jsonl") if (cut / "metrics.jsonl").is_file() else []
        if any(r.get("step", 0) >= 3 and "loss" in r for r in rows):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "saved checkpoint" in out and not (cut / "final").exists()
    stopped_at = max(int(p.name.split("-")[1]) for p in (cut / "checkpoints").glob("step-*"))
    assert 3 <= stopped_at < 12
    assert main(sft_args(tiny_model, arith_dir, cut, *base, "resume=auto")) == 0
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, arith_dir, tmp_path):
    """torchrun with 2 gloo ranks x batch 4 == 1 process x batch 8 (same rows per step, exact normalisation)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["max_steps=4", "data.eval_split=0", "dtype=float32"]
    assert main(sft_args(tiny_model, arith_dir, one, *common, "batch_size=8")) == 0
    proc = _run_cli(sft_args(tiny_model, arith_dir, two, *common, "batch_size=4") + ["--nproc", "2"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_fsdp_with_lora_is_refused_by_name(tiny_model, arith_dir, tmp_path, capsys):
    assert main(sft_args(tiny_model, arith_dir, tmp_path / "x", "strategy=fsdp", "lora.r=4")) == 2
    assert "`strategy: fsdp` with LoRA" in capsys.readouterr().err


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume(tiny_model, arith_dir, tmp_path):
    """strategy=fsdp (FSDP2 over 2 gloo ranks x batch 4: each rank holds half of every parameter and of the Adam
    state) == 1 process x batch 8; the final folder is the gathered model, tied weights stored once. A run resumed
    from the sharded run's step-2 checkpoint (model, optimizer, data position gathered and re-sharded) ends on the
    same weights."""
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    common = ["max_steps=4", "data.eval_split=0", "dtype=float32"]
    assert main(sft_args(tiny_model, arith_dir, one, *common, "batch_size=8")) == 0
    fsdp = [*common, "batch_size=4", "strategy=fsdp", "save.steps=2", "save.keep=2"]
    for out, extra in ((two, []), (resumed, [f"resume={two / 'checkpoints' / 'step-2'}"])):
        proc = _run_cli(sft_args(tiny_model, arith_dir, out, *fsdp, *extra) + ["--nproc", "2"])
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log
    assert f"resumed from {two / 'checkpoints' / 'step-2'} at step 2" in log
    a, b, c = (load_file(d / "final" / "model.safetensors") for d in (one, two, resumed))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b[k], c[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if "loss" in r] == [4]  # steps 3-4 only
