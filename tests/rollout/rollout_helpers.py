"""A tiny ChatML tokenizer and tiny Llama models for the rollout tests, built locally (no hub)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "\n", " "] + list("abcdefghijklmnopqrstuvwxyz0123456789+=?.,!")


def build_tokenizer(out_dir) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ids 0..2 are <|pad|>, <|im_start|>, <|im_end|>, then the words."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
                                   bos_token="<|im_start|>", unk_token="?")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)
    return PreTrainedTokenizerFast.from_pretrained(out_dir)


def build_model(vocab_size: int, *, seed: int = 0, dtype=torch.float32, eos_bias: float = 0.0, eos_id: int = 2):
    """Tiny Llama; eos_bias > 0 raises the EOS logit so responses end early."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=eos_id, bos_token_id=1)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        # random init is nearly uniform; sharpen it so greedy / top-k / top-p paths are distinguishable
        model.lm_head.weight.mul_(20.0)
        if eos_bias:
            head = torch.nn.Linear(cfg.hidden_size, vocab_size, bias=True, dtype=dtype)
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[eos_id] = eos_bias
            model.lm_head = head
    model.eval()
    return model



def build_gpt2(vocab_size: int, *, seed: int = 0, dtype=torch.float64):
    """Tiny GPT-2: learned absolute positions, so wrong position ids under left padding change its outputs
    (Llama's rotary embeddings are relative and would hide a constant shift)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).to(dtype)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(50.0)  # make positions matter for the argmax
        model.lm_head.weight.mul_(20.0)
    return model.eval()
