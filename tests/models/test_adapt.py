"""Freezing, LoRA, the adapter-off reference and atomic saving."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.config import FreezeConfig, LoraConfig
from posttrain.models import (
    apply_freeze,
    apply_lora,
    count_parameters,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    reference_context,
    save_pretrained_atomic,
)

IDS = torch.tensor([[3, 17, 42, 8, 99, 5], [7, 7, 12, 64, 2, 30]])  # (2, 6)


def test_freeze_trains_top_block_plus_extra_by_hand(make_llama):
    """3 blocks, V=50, untied. trainable_layers=1 + extra [norm, lm_head]: block 2 (q 32*32 + k,v 2*32*16
    + o 32*32 + mlp 3*32*64 + norms 2*32 = 9280) + final norm 32 + lm_head 50*32 = 1600 -> 10912."""
    model = make_llama(50, layers=3)
    apply_freeze(model, FreezeConfig(trainable_layers=1, extra=["norm", "lm_head", "score"]))
    assert count_parameters(model)[0] == 9280 + 32 + 1600
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("model.layers.2.", "model.norm.", "lm_head.")) for n in trainable)
    assert "model.layers.1.input_layernorm.weight" not in trainable  # `norm` matches the final norm only


def test_freeze_zero_layers_trains_only_the_new_head(tiny_dir):
    """Linear probing: trainable_layers=0, extra [score] -> only the (2, 128) head = 256 parameters."""
    clf = load_sequence_classifier(tiny_dir, num_labels=2, device="cpu")
    apply_freeze(clf, FreezeConfig(trainable_layers=0, extra=["score"]))
    assert count_parameters(clf)[0] == 256


def test_freeze_minus_one_keeps_everything_trainable(make_llama):
    model = make_llama(50, layers=3)
    apply_freeze(model, FreezeConfig(trainable_layers=-1))
    trainable, total = count_parameters(model)
    assert trainable == total


def _perturb_lora(model, seed=0):
    """LoRA starts with B = 0 (adapted == base); give B random values so the adapter does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_lora_reference_context_gives_base_outputs_exactly(tiny_dir):
    base = load_causal_lm(tiny_dir, device="cpu")
    with torch.no_grad():
        base_logits = base(IDS).logits.clone()
    lora = apply_lora(base, LoraConfig(r=4, alpha=8), "causal_lm")
    _perturb_lora(lora)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        adapted = lora(IDS).logits
        with reference_context(lora) as ref:
            reference = ref(IDS).logits
        again = lora(IDS).logits
    assert torch.equal(reference, base_logits)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    assert torch.equal(again, adapted)  # the adapter is back on after the block


def test_lora_rank_zero_returns_model_unchanged(make_llama):
    model = make_llama(50)
    assert apply_lora(model, LoraConfig(r=0), "causal_lm") is model


def test_reference_context_needs_lora(make_llama):
    with pytest.raises(ValueError, match="LoRA"):
        with reference_context(make_llama(50)):
            pass


def test_lora_save_and_merge_load_with_same_logits(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    lora = apply_lora(load_causal_lm(tiny_dir, tokenizer=tok, device="cpu"), LoraConfig(r=4, alpha=8), "causal_lm")
    _perturb_lora(lora)
    with torch.no_grad():
        want = lora(IDS).logits
    out = save_pretrained_atomic(lora, tok, tmp_path / "final", merge_lora=True)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "merged" / "model.safetensors").is_file() and (out / "merged" / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), out)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(adapter(IDS).logits, want, rtol=0, atol=1e-6)
        assert torch.equal(lora(IDS).logits, want)  # merging worked on a copy: the adapter is intact
    # The adapter folder itself also loads through the ordinary path (transformers' peft integration).
    again = load_causal_lm(out, tokenizer=load_tokenizer(out), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, want, rtol=0, atol=1e-6)


def test_lora_sequence_classifier_keeps_score_head_trainable(tiny_dir, tmp_path):
    clf = load_sequence_classifier(tiny_dir, num_labels=2, id2label=["neg", "pos"], device="cpu")
    lora = apply_lora(clf, LoraConfig(r=4), "seq_cls")
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in n for n in trainable)
    assert all("lora_" in n or "score." in n for n in trainable)
    out = save_pretrained_atomic(lora, None, tmp_path / "clf", merge_lora=True)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert merged.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, lora(IDS).logits, rtol=0, atol=1e-5)


def test_atomic_save_failure_keeps_previous_folder_and_leaves_nothing(tiny_dir, tmp_path):
    """A failure after the weights are written (here: in the `extra` step) must leave the old
    `out` untouched and no temporary folder beside it."""
    model = load_causal_lm(tiny_dir, device="cpu")
    out = tmp_path / "final"
    out.mkdir()
    (out / "previous.txt").write_text("good checkpoint")

    def fail(folder):
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained_atomic(model, None, out, extra=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]

    save_pretrained_atomic(model, None, out, extra=lambda f: (f / "stats.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "stats.json"} <= names and "previous.txt" not in names
