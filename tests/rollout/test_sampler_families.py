"""The sampler on every model family: greedy == transformers' `generate`, log-probs == a forward pass.

Tiny random models of each family are built locally from transformers' config classes and share the embedded
default's tokenizer (byte-level BPE, ChatML). The sliding-window families (Mistral, Qwen2 with use_sliding_window,
Gemma 2, Gemma 3, Phi-3) get a window of 4 tokens, far shorter than the prompts, than the left padding between them and
than prompt + response: their caches keep only the window's keys, and their masks differ per layer type.

Each model's EOS logit is raised so that rows end at different steps: finished rows are dropped from the KV cache
mid-generation, which is the cache operation most likely to go wrong on a sliding-window cache.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from transformers import AutoTokenizer

from posttrain.config import RolloutConfig
from posttrain.rollout import Sampler

WINDOW = 4
# Weights drawn at std 0.3, not transformers' 0.02: at 0.02 a 2-layer model's next token is nearly a function of the
# current token alone (attention barely moves the residual stream), so a wrong mask or cache could go unseen.
INIT_STD = 0.3
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)


def _config(family: str, vocab: int, special: dict):
    """(model class, config) of a tiny random model of `family`; post-head scalings and softcaps set to
    values that change the logits (Granite divides by 4, Cohere multiplies by 0.25, Gemma caps at 30 / 20)."""
    c = dict(vocab_size=vocab, initializer_range=INIT_STD, tie_word_embeddings=False, **special)
    if family == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**COMMON, **c)
    if family == "mistral":
        return tf.MistralForCausalLM, tf.MistralConfig(**COMMON, sliding_window=WINDOW, **c)
    if family == "qwen2":  # layer 0 full attention, layer 1 sliding (max_window_layers=1)
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW,
                                                    max_window_layers=1, **c)
    if family == "gemma2":  # layers alternate sliding / full; softcapping needs eager attention
        cfg = tf.Gemma2Config(**COMMON, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **c)
        return tf.Gemma2ForCausalLM, cfg
    if family == "gemma3":
        cfg = tf.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                  layer_types=["sliding_attention", "full_attention"],
                                  final_logit_softcapping=20.0, **c)
        return tf.Gemma3ForCausalLM, cfg
    if family == "phi3":  # Phi-3-mini's own config has a 2047-token window
        return tf.Phi3ForCausalLM, tf.Phi3Config(**COMMON, sliding_window=WINDOW, **c)
    if family == "cohere":
        return tf.CohereForCausalLM, tf.CohereConfig(**COMMON, logit_scale=0.25, **c)
    if family == "granite":
        return tf.GraniteForCausalLM, tf.GraniteConfig(**COMMON, logits_scaling=4.0, embedding_multiplier=2.0,
                                                        residual_multiplier=0.5, attention_multiplier=0.2, **c)
    if family == "gpt2":
        return tf.GPT2LMHeadModel, tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **c)
    if family == "gpt_neox":
        return tf.GPTNeoXForCausalLM, tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, max_position_embeddings=256, **c)
    raise KeyError(family)


SLIDING = ["mistral", "qwen2", "gemma2", "gemma3", "phi3"]
OTHERS = ["llama", "cohere", "granite", "gpt2", "gpt_neox"]


def build_family_model(family: str, tokenizer, prompts: list[list[int]], *, seed: int = 0):
    """Tiny random float32 model of `family`, its output layer given a bias on EOS: the 10% quantile, over the
    prompts' positions, of how far the EOS logit lies below the largest one, so that EOS wins now and then and rows
    end at different steps. (float32, not float64: transformers' eager mask overflows to -inf in float64 and turns a
    left-padded row into NaN.)"""
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    cls, cfg = _config(family, len(tokenizer), special)
    # Gemma 2 caps attention logits, which SDPA cannot do: transformers' own choice for it is eager
    cfg._attn_implementation = "eager" if family == "gemma2" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg).eval()
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        raw = []
        hook = head.register_forward_hook(lambda mod, args, out: raw.append(out[0]))
        for p in prompts:
            model(input_ids=torch.tensor([p]))
        hook.remove()
        raw = torch.cat(raw)  # (prompt tokens, V) the head's outputs before any family scaling or softcap
        biased.bias[eos] = (raw.max(-1).values - raw[:, eos]).quantile(0.1)
    model.set_output_embeddings(biased)
    return model


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def prompts(tok):
    """Prompts of 1, 6, 23 and 33 tokens: shorter and longer than the window, left-padded by up to 32."""
    texts = ["7", "What is 12 + 7?", "The quick brown fox jumps over the lazy dog.",
             "Hello! How can I help you today? Please answer in one short sentence."]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def generate_alone(model, prompt: list[int], max_new: int, eos: int, pad: int) -> list[int]:
    """transformers' greedy `generate` on one unpadded prompt, cut after the first EOS."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad,
                         top_k=None, top_p=None, temperature=None)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def forward_logprobs(model, batch, temperature: float) -> torch.Tensor:
    """(N, R) log_softmax(logits / T) of the model's own logits (scalings and softcaps included) at the
    sampled tokens, one forward over the final left-padded sequences, no cache."""
    with torch.no_grad():
        logits = model(input_ids=batch.sequences, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids()).logits
    p = batch.prompt_width
    lp = torch.log_softmax(logits[:, p - 1:-1].double() / temperature, -1)
    return lp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask


def check_greedy_equals_generate(family, tok, prompts, max_new=12):
    model = build_family_model(family, tok, prompts)
    batch = Sampler(model, tok, RolloutConfig(max_new_tokens=max_new)).generate(prompts, greedy=True)
    lengths = batch.response_lengths().tolist()
    for i, prompt in enumerate(prompts):
        assert batch.response_ids[i, : lengths[i]].tolist() == generate_alone(
            model, prompt, max_new, tok.eos_token_id, tok.pad_token_id), (family, i)
    return lengths


def check_logprobs_equal_forward(family, tok, prompts, temperature=0.7):
    model = build_family_model(family, tok, prompts, seed=1)
    cfg = RolloutConfig(max_new_tokens=10, temperature=temperature, top_k=50)
    batch = Sampler(model, tok, cfg).generate(prompts, num_samples=3, generator=torch.Generator().manual_seed(0))
    kept = Sampler(model, tok, cfg, drop_finished=False).generate(
        prompts, num_samples=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch.sequences, kept.sequences)  # dropping finished rows changes no sample
    torch.testing.assert_close(batch.logprobs.double(), forward_logprobs(model, batch, temperature), atol=1e-5, rtol=0)
    return batch.response_lengths().tolist()


@pytest.mark.parametrize("family", SLIDING + OTHERS)
def test_greedy_left_padded_equals_generate(family, tok, prompts):
    """Four prompts of 1..33 tokens, left-padded to 33, decoded greedily for up to 12 tokens: each row's tokens equal
    transformers' `generate` on that prompt alone. With a 4-token window, rows end at different steps (finished rows
    leave the sliding cache) and one runs past the window after its prompt."""
    lengths = check_greedy_equals_generate(family, tok, prompts)
    if family in SLIDING:
        assert len(set(lengths)) > 1 and max(lengths) > WINDOW, lengths


@pytest.mark.parametrize("family", SLIDING + OTHERS)
def test_sampler_logprobs_equal_forward_pass(family, tok, prompts):
    """Sampled at T=0.7 with top-k: the sampler's log-probs equal log_softmax(logits / 0.7) of one forward pass over
    the final sequences (the model's own logits: Granite's and Cohere's scaling, Gemma's softcaps) to 1e-5, and
    keeping finished rows gives the same samples."""
    lengths = check_logprobs_equal_forward(family, tok, prompts)
    if family in SLIDING:
        assert len(set(lengths)) > 1, lengths


@pytest.mark.parametrize("family", SLIDING + OTHERS)
def test_decoding_mask_shortcut_only_without_a_window(family, tok, prompts):
    """Under SDPA the decoding steps pass their own (A, 1, 1, L) padding mask on models whose every layer sees the
    whole cache (no cost added to them), and transformers' per-layer masks from the 2D mask on windowed models."""
    model = build_family_model(family, tok, prompts)
    step_mask = Sampler(model, tok)._mask_kind(padded=True)(torch.ones(2, 5, dtype=torch.long))
    sdpa = model.config._attn_implementation == "sdpa"
    assert step_mask.dim() == (4 if sdpa and family not in SLIDING else 2)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_shared_prefill_equals_one_prefill_per_row(family, tok, prompts):
    """Four samples of each prompt at T=0.9 with top-p: prefilling each distinct prompt once and copying its KV cache
    and last logits to the group's four rows gives exactly (torch.equal) the tokens and log-probs of prefilling every
    row on its own, with the same uniforms: on Llama, and on the sliding-window Mistral (a 4-token window, shorter
    than every prompt but one) and Gemma 2 (sliding / full layers, eager attention). Rows end at different steps, so
    the copied cache is also compacted mid-generation."""
    model = build_family_model(family, tok, prompts, seed=2)
    cfg = RolloutConfig(max_new_tokens=10, temperature=0.9, top_p=0.95)
    widths = []  # the batch size of each forward: the prefill's is the first
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: widths.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    run = lambda share: Sampler(model, tok, cfg, share_prefill=share).generate(  # noqa: E731
        prompts, num_samples=4, generator=torch.Generator().manual_seed(5))
    shared, n_shared = run(True), len(widths)
    alone = run(False)
    hook.remove()
    assert (widths[0], widths[n_shared]) == (4, 16)  # one prefill row per prompt, against one per sample
    assert torch.equal(shared.sequences, alone.sequences) and torch.equal(shared.logprobs, alone.logprobs)
    lengths = shared.response_lengths().view(len(prompts), 4)
    assert (lengths.max(1).values > lengths.min(1).values).any(), lengths  # a group's samples differ
