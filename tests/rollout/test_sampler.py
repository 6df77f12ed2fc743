"""The KV-cached sampler against references that use no cache and no padding."""

from __future__ import annotations

import pytest
import torch
from rollout_helpers import build_gpt2, build_model

from posttrain.config import RolloutConfig
from posttrain.rollout import RolloutBatch, Sampler, assemble_batch, filter_logits, sample_from_probs

EOS, PAD = 2, 0
PROMPTS = [[1, 28, 26, 12, 7], [1, 5], [1, 9, 10, 11, 30, 31, 32, 33, 6], [1, 40]]


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding of one unpadded prompt by full forward passes (no cache, no mask), stopping at EOS."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == EOS:
                break
    return out


def full_forward_logprobs(model, batch: RolloutBatch, temperature: float) -> torch.Tensor:
    """(N, R) log_softmax(logits / T) at the response tokens from one forward over the final sequences."""
    with torch.no_grad():
        logits = model(input_ids=batch.sequences, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids()).logits
    p = batch.prompt_width
    lp = torch.log_softmax(logits[:, p - 1:-1].double() / temperature, -1)
    return lp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask


@pytest.fixture(scope="module")
def model64():
    return build_model(50, seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def eos_model():
    """EOS logit raised by 3: responses end after a few tokens, at different steps per row."""
    return build_model(50, seed=1, dtype=torch.float64, eos_bias=3.0)


def test_greedy_with_left_padding_equals_unpadded_decoding(model64, eos_model, tokenizer):
    """Prompts of lengths 5, 2, 9, 2 padded to 9 on the left decode exactly as each prompt alone
    (this is what position ids from the mask and the attention mask must guarantee; GPT-2's absolute
    positions catch wrong position ids, Llama's rotary ones catch wrong masks)."""
    for model in (model64, eos_model, build_gpt2(50)):
        batch = Sampler(model, tokenizer, RolloutConfig(max_new_tokens=10)).generate(PROMPTS, greedy=True)
        assert batch.prompt_width == 9
        for i, prompt in enumerate(PROMPTS):
            n = int(batch.response_lengths()[i])
            assert batch.response_ids[i, :n].tolist() == reference_greedy(model, prompt, 10)


def test_sampling_logprobs_equal_full_forward(model64, tokenizer):
    """Returned log-probs = log_softmax(logits / T) of a forward pass over the final sequences, with
    top-k / top-p on (they change which token is drawn, not the log-prob of the unfiltered distribution)."""
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.95)
    batch = Sampler(model64, tokenizer, cfg).generate(PROMPTS, num_samples=3, generator=torch.Generator().manual_seed(0))
    ref = full_forward_logprobs(model64, batch, 0.7)
    torch.testing.assert_close(batch.logprobs.double(), ref, atol=1e-5, rtol=0)
    assert (batch.logprobs[batch.response_mask == 0] == 0).all()
    assert not batch.logprobs.requires_grad


def test_response_mask_stops_at_first_eos(eos_model, tokenizer):
    """With the EOS logit raised, rows end at different steps: mask is 1 through the first EOS, pad after,
    ended_with_eos says whether an EOS is there; the attention mask covers exactly prompt + masked response."""
    cfg = RolloutConfig(max_new_tokens=6, temperature=1.0)
    batch = Sampler(eos_model, tokenizer, cfg).generate(PROMPTS, num_samples=8, generator=torch.Generator().manual_seed(3))
    lengths = batch.response_lengths()
    assert batch.ended_with_eos.any() and (~batch.ended_with_eos).any()
    assert len(set(lengths.tolist())) > 2
    for i in range(batch.response_ids.shape[0]):
        ids, n = batch.response_ids[i].tolist(), int(lengths[i])
        eos_at = [j for j, t in enumerate(ids[:n]) if t == EOS]
        if batch.ended_with_eos[i]:
            assert eos_at == [n - 1]
        else:
            assert eos_at == [] and n == 6
        assert all(t == PAD for t in ids[n:])
        assert batch.response_mask[i].tolist() == [1.0] * n + [0.0] * (len(ids) - n)
    prompt_mask = batch.attention_mask[:, : batch.prompt_width]
    assert torch.equal(batch.attention_mask[:, batch.prompt_width:], batch.response_mask.long())
    assert prompt_mask.sum(-1).tolist() == [len(PROMPTS[i]) for i in batch.prompt_index.tolist()]


@pytest.mark.parametrize("cfg", [
    RolloutConfig(max_new_tokens=8, temperature=1e-3),
    RolloutConfig(max_new_tokens=8, temperature=1.0, top_k=1),
    RolloutConfig(max_new_tokens=8, temperature=1.0, top_p=1e-6),
], ids=["temperature->0", "top_k=1", "top_p tiny"])
def test_limits_equal_greedy(model64, tokenizer, cfg):
    """T -> 0, top-k = 1 and a tiny top-p each leave only the most likely token."""
    greedy = Sampler(model64, tokenizer, RolloutConfig(max_new_tokens=8)).generate(PROMPTS, greedy=True)
    sampled = Sampler(model64, tokenizer, cfg).generate(PROMPTS, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled.response_ids, greedy.response_ids)


def test_reproducible_with_seeded_generator(model64, tokenizer):
    sampler = Sampler(model64, tokenizer, RolloutConfig(max_new_tokens=8))
    a = sampler.generate(PROMPTS, num_samples=2, generator=torch.Generator().manual_seed(7))
    b = sampler.generate(PROMPTS, num_samples=2, generator=torch.Generator().manual_seed(7))
    c = sampler.generate(PROMPTS, num_samples=2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_dropping_finished_rows_gives_the_same_samples(eos_model, tokenizer):
    """Each row draws its own uniform every step, so removing finished rows from the batch and the
    KV cache must not change any sample or log-prob."""
    cfg = RolloutConfig(max_new_tokens=10, temperature=1.0)
    kept = Sampler(eos_model, tokenizer, cfg, drop_finished=False).generate(
        PROMPTS, num_samples=6, generator=torch.Generator().manual_seed(5))
    dropped = Sampler(eos_model, tokenizer, cfg).generate(PROMPTS, num_samples=6, generator=torch.Generator().manual_seed(5))
    assert len(set(dropped.response_lengths().tolist())) > 3  # rows really finished at different steps
    assert torch.equal(kept.response_ids, dropped.response_ids)
    torch.testing.assert_close(kept.logprobs, dropped.logprobs, atol=1e-6, rtol=0)


def test_num_samples_chunks_and_mode(model64, tokenizer):
    """Rows are prompt-major; generation_batch_size chunks do not change greedy outputs; the model's
    train/eval mode is restored."""
    whole = Sampler(model64, tokenizer, RolloutConfig(max_new_tokens=5)).generate(PROMPTS, num_samples=2, greedy=True)
    assert whole.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert torch.equal(whole.response_ids[0::2], whole.response_ids[1::2])
    model64.train()
    chunked = Sampler(model64, tokenizer, RolloutConfig(max_new_tokens=5, generation_batch_size=3)).generate(
        PROMPTS, num_samples=2, greedy=True)
    assert model64.training
    model64.eval()
    assert torch.equal(chunked.sequences, whole.sequences)


def test_filter_logits_by_hand():
    """top-k=2 of [3, 2, 1, 0] keeps 3 and 2. Probabilities [0.5, 0.3, 0.2]: top-p=0.6 keeps 0.5 (mass before 0)
    and 0.3 (mass before 0.5 < 0.6), drops 0.2 (mass before 0.8); top-p=0.5 keeps only 0.5 (0.5 >= 0.5)."""
    inf = float("-inf")
    assert filter_logits(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), top_k=2).tolist() == [[3.0, 2.0, inf, inf]]
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()
    assert torch.isinf(filter_logits(logits, top_p=0.6)).tolist() == [[True, False, False]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, True]]
    assert torch.equal(filter_logits(logits), logits)


def test_inverse_cdf_sampling_by_hand():
    """probs [0.2, 0, 0.5, 0.3] -> cdf [0.2, 0.2, 0.7, 1.0]: u=0.1 -> 0, u=0.2 -> 2 (never the empty token 1),
    u=0.69 -> 2, u=0.7 -> 3. On the grid u=(i+0.5)/1000 the counts are exactly 200, 0, 500, 300.
    u=1 (what rounding can produce) on [0.5, 0.5, 0] returns 1, not the zero-probability tail."""
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]], dtype=torch.float64)
    u = torch.tensor([0.1, 0.2, 0.69, 0.7], dtype=torch.float64)
    assert sample_from_probs(probs.expand(4, 4), u).tolist() == [0, 2, 2, 3]
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    counts = torch.bincount(sample_from_probs(probs.expand(1000, 4), grid), minlength=4)
    assert counts.tolist() == [200, 0, 500, 300]
    assert sample_from_probs(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([1.0])).tolist() == [1]


def test_assemble_and_texts(tokenizer):
    """Two prompts (lengths 2, 1) and responses "ab<|im_end|>" and "c" (no EOS): left padding to P=2,
    response width 3, texts without special tokens."""
    a, b, c = (tokenizer.convert_tokens_to_ids(x) for x in "abc")
    batch = assemble_batch([[1, 5], [1]], [[a, b, EOS], [c]], [[-1.0, -2.0, -3.0], [-0.5]], [0, 1], eos_id=EOS, pad_id=PAD)
    assert batch.sequences.tolist() == [[1, 5, a, b, EOS], [PAD, 1, c, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch.position_ids().tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]
    assert batch.ended_with_eos.tolist() == [True, False]
    assert batch.logprobs.tolist() == [[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]]
    assert batch.texts(tokenizer) == ["ab", "c"]


def test_pad_equal_to_eos_is_refused(model64, tokenizer):
    class SameIds:
        eos_token_id = pad_token_id = EOS

    with pytest.raises(ValueError, match="different pad"):
        Sampler(model64, SameIds(), RolloutConfig())


def test_decoding_steps_own_padding_mask_is_bit_identical(tokenizer):
    """The decoding steps pass the (A, 1, 1, L) padding mask themselves instead of letting transformers build it from
    the 2D mask: samples and log-probs equal bit for bit (left-padded prompts, rows finishing and dropped early)."""
    model = build_model(50, seed=1, dtype=torch.float32, eos_bias=3.0)
    assert model.config._attn_implementation == "sdpa"  # the only implementation the shortcut applies to
    cfg = RolloutConfig(max_new_tokens=10, temperature=1.0)
    fast = Sampler(model, tokenizer, cfg)
    plain = Sampler(model, tokenizer, cfg)
    plain._mask_kind = lambda padded: (lambda attn: attn)  # always the 2D mask, transformers' own construction
    for seed in range(3):
        a = fast.generate(PROMPTS, num_samples=4, generator=torch.Generator().manual_seed(seed))
        b = plain.generate(PROMPTS, num_samples=4, generator=torch.Generator().manual_seed(seed))
        assert len(set(a.response_lengths().tolist())) > 2
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)


def test_rollout_tensors_can_enter_a_loss(model64, tokenizer):
    """Sampling runs under inference_mode; the returned batch must still be usable as constants in a graph
    (a product saves its inputs for the backward pass, which inference tensors forbid)."""
    batch = Sampler(model64, tokenizer, RolloutConfig(max_new_tokens=4)).generate(PROMPTS, generator=torch.Generator().manual_seed(0))
    weight = torch.ones((), dtype=torch.float32, requires_grad=True)
    (weight * batch.logprobs * batch.response_mask).sum().backward()
    assert weight.grad is not None


def test_a_row_slice_samples_what_the_whole_batch_gives_those_rows(eos_model, tokenizer):
    """Two processes each sampling half the prompts with the same generator seed and their row_offset get, row for
    row, the samples one process gets for all of them (each step draws the whole batch's uniforms; rows end at
    different steps, so the halves stop drawing at different times)."""
    prompts = PROMPTS
    sampler = Sampler(eos_model, tokenizer, RolloutConfig(max_new_tokens=8, temperature=1.0))
    whole = sampler.generate(prompts, num_samples=2, generator=torch.Generator().manual_seed(3))
    n, half = 2 * len(prompts), len(prompts) // 2
    parts = [sampler.generate(prompts[:half], num_samples=2, generator=torch.Generator().manual_seed(3),
                              row_offset=0, total_rows=n),
             sampler.generate(prompts[half:], num_samples=2, generator=torch.Generator().manual_seed(3),
                              row_offset=2 * half, total_rows=n)]
    rows = [ids[:k].tolist() for part in parts for ids, k in zip(part.response_ids, part.response_lengths())]
    assert rows == [ids[:k].tolist() for ids, k in zip(whole.response_ids, whole.response_lengths())]
    assert len({tuple(r) for r in rows}) > 1  # the rows are not all alike
    with pytest.raises(ValueError, match="total_rows"):
        sampler.generate(prompts, generator=torch.Generator(), row_offset=1, total_rows=len(prompts))
