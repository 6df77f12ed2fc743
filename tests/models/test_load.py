"""Tokenizer normalisation, dtypes, classifier heads, dropout, parameter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from posttrain.config import ConfigError
from posttrain.models import (
    count_parameters,
    disable_dropout,
    load_causal_lm,
    load_sequence_classifier,
    load_tokenizer,
    resolve_dtype,
    save_pretrained_atomic,
)


def test_plain_tokenizer_gets_chatml_eos_and_new_pad(plain_dir):
    """No template, eos <|endoftext|>, no pad: ChatML is imposed, its <|im_start|>/<|im_end|> and a
    <|pad|> are added (3 new ids), and EOS becomes <|im_end|>, the token that ends a turn."""
    before = AutoTokenizer.from_pretrained(plain_dir)
    tok = load_tokenizer(plain_dir)
    assert len(tok) == len(before) + 3
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_causal_lm_is_resized_for_added_tokens(plain_dir):
    tok = load_tokenizer(plain_dir)
    model = load_causal_lm(plain_dir, tokenizer=tok, device="cpu")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id
    # the end-of-turn EOS stops generation first; the folder's own stop id stays after it
    assert model.generation_config.eos_token_id == [tok.eos_token_id, 2]


def test_own_template_end_of_turn_becomes_eos_and_unused_pad_token_is_reused(tmp_path, make_bpe):
    """A Llama-3-style tokenizer: eos <|end_of_text|>, pad <|eot_id|>, the template ends turns with <|eot_id|>,
    an unused <|finetune_right_pad_id|> exists. Expected: eos <|eot_id|>; the pad, now equal to eos, is
    replaced by the unused pad token; nothing added."""
    special = ["<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>"]
    template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    raw = PreTrainedTokenizerFast(tokenizer_object=make_bpe(special), eos_token="<|end_of_text|>", pad_token="<|eot_id|>")
    raw.add_special_tokens({"additional_special_tokens": special[1:]})
    raw.chat_template = template
    raw.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.eos_token == "<|eot_id|>"
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert len(tok) == len(raw)
    assert tok.chat_template == template


def test_jinja_template_string_decides_the_eos(plain_dir):
    """A template that ends turns with <|endoftext|> keeps that as EOS; no ChatML tokens are added, only <|pad|>."""
    before = AutoTokenizer.from_pretrained(plain_dir)
    tok = load_tokenizer(plain_dir, chat_template="{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}")
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert len(tok) == len(before) + 1


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float64) == torch.float64
    with pytest.raises(ConfigError, match="unknown dtype `half4`"):
        resolve_dtype("half4")


def test_load_in_bf16(tiny_dir):
    model = load_causal_lm(tiny_dir, dtype="bfloat16", device="cpu")
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_classifier_head_on_causal_folder_saves_and_predicts_label_names(tiny_dir, tmp_path):
    """A new (2, 128) `score` head on the pre-trained backbone; after an atomic save the folder loads with
    AutoModelForSequenceClassification, keeps the label names and gives the same logits."""
    tok = load_tokenizer(tiny_dir)
    causal = load_causal_lm(tiny_dir, tokenizer=tok, device="cpu")
    clf = load_sequence_classifier(tiny_dir, num_labels=2, id2label=["negative", "positive"], tokenizer=tok, device="cpu")
    assert clf.score.weight.shape == (2, 128)
    assert torch.equal(clf.model.embed_tokens.weight, causal.model.embed_tokens.weight)
    assert clf.config.pad_token_id == tok.pad_token_id
    save_pretrained_atomic(clf, tok, tmp_path / "final")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
    batch = tok(["the movie was wonderful", "cold food"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want, got = clf(**batch).logits, loaded(**batch).logits  # (2, 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    names = [loaded.config.id2label[i] for i in got.argmax(-1).tolist()]
    assert set(names) <= {"negative", "positive"}


def test_reward_model_head_has_one_output(tiny_dir):
    rm = load_sequence_classifier(tiny_dir, num_labels=1, device="cpu")
    assert rm.score.weight.shape == (1, 128) and rm.config.pad_token_id is not None


def test_disable_dropout_makes_train_mode_deterministic(make_llama):
    model = make_llama(50, attention_dropout=0.5)
    model.train()
    ids = torch.arange(10).view(1, 10)
    assert not torch.equal(model(ids).logits, model(ids).logits)
    disable_dropout(model)
    assert model.config.attention_dropout == 0.0
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_count_parameters_by_hand(make_llama):
    """V=50, untied: embed 50*32 + lm_head 50*32 + 2 layers * (q 32*32 + k,v 2*32*16 + o 32*32 + mlp 3*32*64
    + norms 2*32 = 9280) + final norm 32 = 1600 + 1600 + 18560 + 32 = 21792."""
    model = make_llama(50)
    assert count_parameters(model) == (21792, 21792)
    model.lm_head.weight.requires_grad_(False)
    assert count_parameters(model) == (21792 - 1600, 21792)
