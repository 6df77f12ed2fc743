"""The embedded tiny model: an ordinary HF folder with a ChatML tokenizer."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.config import TinyModelConfig
from posttrain.models import count_parameters, load_causal_lm, load_tokenizer
from posttrain.models.forward import attention_name
from posttrain.models.tiny import FALLBACK_CORPUS, build_tokenizer, main, make_tiny_model


def test_tiny_round_trip_with_auto_classes(tiny_dir):
    """AutoTokenizer / AutoModelForCausalLM load the folder; pad != eos = <|im_end|>; no bos."""
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_tiny_chat_template_is_chatml_and_ends_turns_with_im_end(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False).input_ids
    # The assistant turn ends with the EOS token itself (one id), then the newline.
    assert ids[-2] == tok.eos_token_id and tok.decode(ids[-1:]) == "\n"
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2


def test_byte_level_bpe_encodes_any_text_losslessly():
    tok = build_tokenizer(FALLBACK_CORPUS, 300)
    text = "héllo wörld ✓ 12345 \t\n tabs"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.bos_token is None and len(tok) <= 300


def test_tiny_parameter_count_by_hand(tiny_dir):
    """Tied embeddings, V = vocab: V*128 + 4 * (q 128*128 + k,v 2*128*64 + o 128*128 + mlp 3*128*384
    + two norms 2*128) + final norm 128."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    v = model.config.vocab_size
    per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 384 + 2 * 128
    assert count_parameters(model) == (v * 128 + 4 * per_layer + 128,) * 2
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_init_depends_only_on_seed():
    torch.manual_seed(123)
    before = torch.rand(1)
    a, _ = make_tiny_model("tiny", 300, seed=1, corpus=FALLBACK_CORPUS)
    b, _ = make_tiny_model("tiny", 300, seed=1, corpus=FALLBACK_CORPUS)
    c, _ = make_tiny_model("tiny", 300, seed=2, corpus=FALLBACK_CORPUS)
    torch.manual_seed(123)
    assert torch.equal(before, torch.rand(1))  # the caller's RNG stream is untouched
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_posttrain_loaders_accept_the_tiny_folder_unchanged(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    model = load_causal_lm(tiny_dir, tokenizer=tok, device="cpu")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert len(tok) == model.config.vocab_size  # nothing added, no resize
    assert attention_name(model) == "sdpa"


def test_main_writes_folder_and_prints_parameter_count(tmp_path, capsys):
    out = main(TinyModelConfig(output_dir=str(tmp_path / "tiny"), size="tiny", vocab_size=300, seed=0))
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    printed = capsys.readouterr().out
    _, total = count_parameters(AutoModelForCausalLM.from_pretrained(out))
    assert f"{total:,} parameters" in printed
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temp folder left beside it
