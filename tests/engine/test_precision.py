"""`dtype: bfloat16` on the CPU: float32 master weights under autocast lose no update, the EMA reference moves by
exactly eta, a cached reference matches the training forward (DPO's first loss is log 2, PPO's first ratio is 1),
and final/ is written in the asked dtype and reloads. Tiny model, 2-3 steps each."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.engine import autocast_dtype, grad_scaler, read_metrics
from posttrain.models import load_causal_lm, load_tokenizer
from tests.recipes.test_ppo import ppo_args


def sft_args(model, arith_dir, out, *extra):
    return ["sft", f"model={model}", f"data.train={arith_dir / 'sft.jsonl'}", f"output_dir={out}", "batch_size=4",
            "max_length=64", "max_steps=3", "learning_rate=1e-5", "lr_scheduler=constant", "logging.progress=false",
            "resume=false", "data.max_rows=12", "data.eval_split=0", "save.steps=2", *extra]


def weights(folder):
    return {k: v.float() for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def fraction_moved(start, end):
    moved = sum(int((end[k] != start[k]).sum()) for k in start)
    return moved / sum(v.numel() for v in start.values())


def test_autocast_dtype_is_the_compute_dtype_on_the_cpu_too():
    """bf16 / fp16 autocast on the CPU as on a GPU (the old behaviour trained pure bf16 weights on the CPU);
    auto on the CPU and float32 are no autocast; fp16 alone gets a loss scaler."""
    class Cfg:
        dtype = "bfloat16"
    cpu = torch.device("cpu")
    assert autocast_dtype(Cfg, cpu) == torch.bfloat16 and grad_scaler(torch.bfloat16, cpu) is None
    Cfg.dtype = "float16"
    assert autocast_dtype(Cfg, cpu) == torch.float16 and isinstance(grad_scaler(torch.float16, cpu), torch.amp.GradScaler)
    for name in ("auto", "float32"):
        Cfg.dtype = name
        assert autocast_dtype(Cfg, cpu) is None


@pytest.fixture(scope="module")
def sft_runs(tiny_model, arith_dir, tmp_path_factory):
    """The same 3 SFT steps (a checkpoint after 2) at lr 1e-5 in float32 and in bf16 (float32 master weights under
    bf16 autocast)."""
    root = tmp_path_factory.mktemp("precision-sft")
    for name in ("float32", "bfloat16"):
        assert main(sft_args(tiny_model, arith_dir, root / name, f"dtype={name}")) == 0
    return root


def test_bf16_training_moves_as_many_weights_as_float32(tiny_model, sft_runs):
    """AdamW's first steps move every weight by ~lr = 1e-5 (its update is lr * m / sqrt(v) ~ lr * sign(g)).

    float32 and bf16-autocast runs (float32 master weights) both move ~all weights. The contrast: the same float32
    update applied to bf16 STORAGE, i.e. round(w + delta) in bf16 from the bf16-rounded start, keeps a weight
    unless |delta| > half its rounding step (0.02 has a step of 2^-13 = 1.2e-4, so |delta| must exceed 6.1e-5,
    six times lr): far fewer weights move."""
    start = {k: v.float() for k, v in load_causal_lm(tiny_model, dtype="float32", device="cpu").state_dict().items()}
    f32 = weights(sft_runs / "float32" / "checkpoints" / "step-2")
    b16 = weights(sft_runs / "bfloat16" / "checkpoints" / "step-2")
    keys = [k for k in start if k in f32]
    start = {k: start[k] for k in keys}
    assert all(f32[k].dtype == torch.float32 for k in keys)
    moved_f32 = fraction_moved(start, {k: f32[k] for k in keys})
    moved_b16 = fraction_moved(start, {k: b16[k] for k in keys})
    pure = {k: (start[k].bfloat16() + (f32[k] - start[k]).bfloat16()).float() for k in keys}
    moved_pure = fraction_moved({k: start[k].bfloat16().float() for k in keys}, pure)
    print(f"fraction of weights moved after 2 steps at lr 1e-5: float32 {moved_f32:.3f}, "
          f"bf16 autocast + float32 master {moved_b16:.3f}, bf16 storage {moved_pure:.3f}")
    assert moved_f32 > 0.95 and moved_b16 > 0.95
    assert moved_pure < 0.5 * moved_b16
    # the bf16-compute run's update is the float32 one up to bf16 arithmetic: same direction, same size
    delta_f32 = torch.cat([(f32[k] - start[k]).flatten() for k in keys])
    delta_b16 = torch.cat([(b16[k] - start[k]).flatten() for k in keys])
    assert torch.nn.functional.cosine_similarity(delta_f32, delta_b16, dim=0) > 0.9
    assert delta_b16.abs().mean() == pytest.approx(float(delta_f32.abs().mean()), rel=0.1)


def test_final_is_saved_in_the_asked_dtype_and_reloads(sft_runs):
    """final/: weights and config.json's dtype in the asked dtype; step checkpoints keep the float32 master weights."""
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        final = sft_runs / name / "final"
        assert json.loads((final / "config.json").read_text())["dtype"] == name
        raw = {v.dtype for f in final.glob("*.safetensors") for v in load_file(str(f)).values() if v.is_floating_point()}
        assert raw == {dtype}
        model = AutoModelForCausalLM.from_pretrained(final, dtype="auto")
        assert model.dtype == dtype
        step = {v.dtype for v in load_file(str(sft_runs / name / "checkpoints" / "step-2" / "model.safetensors")).values()}
        assert step == {torch.float32}
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("lora", ["0", "4"])
def test_bf16_dpo_first_loss_is_log2_with_the_cached_reference(tiny_model, arith_dir, tmp_path, lora):
    """Cached reference log-probs under the same autocast as the training forward: at step 1 the policy is the
    reference, so every margin is 0 and the sigmoid loss is -log sigmoid(0) = log 2 = 0.693147... With LoRA the base
    stays bf16 and the adapters (B = 0 at the start) are float32; merged/ is written in bf16."""
    rows = (arith_dir / "prefs.jsonl").read_text().splitlines()[:8]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "dpo"
    assert main(["dpo", f"model={tiny_model}", f"data.train={tmp_path / 'train.jsonl'}", f"output_dir={out}",
                 "batch_size=4", "max_length=64", "max_steps=2", "learning_rate=1e-5", "dtype=bfloat16",
                 "data.eval_split=0", "logging.progress=false", "logging.steps=1", "resume=false", f"lora.r={lora}",
                 "save.merge_lora=true"]) == 0
    first = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == 0.0
    whole = out / "final" / ("merged" if lora != "0" else "")
    assert json.loads((whole / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(whole, dtype="auto").dtype == torch.bfloat16


def test_bf16_ppo_first_ratio_is_one_and_the_ema_moves_by_eta(tiny_model, arith_dir, tmp_path):
    """PPO in bf16 (lr 1e-5, ref_ema 1e-3, one optimizer step per iteration): old log-probs recomputed under the
    loss's autocast, so the first epoch's ratio is exactly 1 (approxkl 0, clipfrac 0); the reference is a float32
    copy, so after iteration 1 ref_1 - ref_0 == eta * (policy_1 - ref_0) to float32 rounding, on every weight the
    policy moved (in bf16 a move of 1e-3 * 1e-5 would round away)."""
    eta, out = 1e-3, tmp_path / "ppo"
    (tmp_path / "r.py").write_text("def reward(prompts, completions):\n    return [len(c) / 10 for c in completions]\n")
    assert main(ppo_args(tiny_model, arith_dir, out, "dtype=bfloat16", "learning_rate=1e-5", f"ref_ema={eta}",
                         "reward.task=", f"reward.function={tmp_path / 'r.py'}:reward",
                         "mini_batch_size=8", "advantage_estimator=rloo", "rollout.samples_per_prompt=2",
                         "total_episodes=16", "save.steps=1", "resume=false")) == 0
    row = [r for r in read_metrics(out / "metrics.jsonl") if "policy/approxkl_avg" in r][0]
    assert row["policy/approxkl_avg"] == 0.0 and row["policy/clipfrac_avg"] == 0.0
    saved = load_file(str(out / "checkpoints" / "step-1" / "model.safetensors"))
    start = load_causal_lm(tiny_model, tokenizer=load_tokenizer(tiny_model), dtype="float32", device="cpu").state_dict()
    moved = total = 0
    for name, ref0 in start.items():
        if f"ref.{name}" not in saved:
            continue  # a tied copy (lm_head = embeddings) is stored once
        policy1, ref1 = saved[f"policy.{name}"], saved[f"ref.{name}"]
        assert ref1.dtype == policy1.dtype == torch.float32
        torch.testing.assert_close(ref1 - ref0, eta * (policy1 - ref0), rtol=0, atol=1e-7)
        moved += int(((ref1 != ref0) & (policy1 != ref0)).sum())
        total += int((policy1 != ref0).sum())
    assert total > 0 and moved / total > 0.5
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"


def test_fp16_trains_float32_weights_with_a_checkpointed_loss_scaler(tiny_model, arith_dir, tmp_path):
    """float16 compute on the CPU: a GradScaler (its scale in the checkpoint, for resume), float32 master weights in
    the checkpoint, final/ in float16. The initial scale 2^16 of the first step is kept or halved, never lost."""
    out = tmp_path / "fp16"
    assert main(sft_args(tiny_model, arith_dir, out, "dtype=float16", "max_steps=2", "save.steps=1", "logging.steps=1")) == 0
    state = json.loads((out / "checkpoints" / "step-1" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] in (2.0**16, 2.0**15)
    step = load_file(str(out / "checkpoints" / "step-1" / "model.safetensors"))
    assert {v.dtype for v in step.values()} == {torch.float32}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "float16"
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
