"""Chunked log-probs and entropies against a plain float64 log_softmax."""

import math

import pytest
import torch

from posttrain.losses.logprobs import entropy_from_logits, logprobs_from_hidden, selective_log_softmax


def test_selective_log_softmax_hand_values():
    """logits (0, ln 2, ln 5): Z = 1 + 2 + 5 = 8, so log p = (ln 1/8, ln 2/8, ln 5/8) = (-2.07944, -1.38629, -0.47000)."""
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]] * 3, dtype=torch.float64)
    got = selective_log_softmax(logits, torch.tensor([0, 1, 2]))
    expected = torch.tensor([math.log(1 / 8), math.log(2 / 8), math.log(5 / 8)], dtype=torch.float64)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selective_log_softmax_matches_log_softmax(dtype):
    """Chunking over rows (chunk_rows=3 over 2*7 rows) equals log_softmax(...).gather in float64; bf16 rows are upcast."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 7, 13, generator=g, dtype=torch.float64) * 3).to(dtype)
    index = torch.randint(0, 13, (2, 7), generator=g)
    got = selective_log_softmax(logits, index, chunk_rows=3)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    assert got.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_entropy_hand_values_and_reference():
    """Uniform over 4 tokens: H = ln 4 = 1.386294; one-hot-ish logits (0, -1e4): H ~ 0. Random rows equal -sum p log p."""
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, -1e4, -1e4, -1e4]], dtype=torch.float64)
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([math.log(4), 0.0], dtype=torch.float64))
    x = torch.randn(3, 5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = torch.softmax(x, -1)
    torch.testing.assert_close(entropy_from_logits(x, chunk_rows=4), -(p * p.log()).sum(-1))


def _reference(hidden, weight, targets, temperature):
    logits = hidden @ weight.T / temperature  # (B, T, V) all at once
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_logprobs_from_hidden_values_and_grads_equal_unchunked_float64():
    """chunk_size=4 over 2*5=10 tokens (uneven last chunk), T=0.7: log-probs, entropy and both
    gradients (w.r.t. hidden and the head) equal the unchunked log_softmax computation."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    upstream = torch.randn(2, 5, dtype=torch.float64, generator=g)

    logp, ent = logprobs_from_hidden(hidden, weight, targets, temperature=0.7, chunk_size=4, return_entropy=True,
                                     unchunked_bytes=0)
    ((logp * upstream).sum() + ent.sum()).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    ref_logp, ref_ent = _reference(hidden, weight, targets, 0.7)
    ((ref_logp * upstream).sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(ent, ref_ent)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    assert logp.shape == targets.shape == ent.shape


def test_logprobs_from_hidden_never_keeps_full_logits_for_backward():
    """N=40 tokens, V=50, chunk 8: the unchunked graph saves a 40*50=2000-element logit tensor;
    the chunked one saves only its inputs (each < 8*50 = 400 elements besides the 50*4 head)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 4, generator=g, requires_grad=True)
    weight = torch.randn(50, 4, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=g)

    def saved_sizes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn().sum().backward()
        return sizes

    plain = saved_sizes(lambda: _reference(hidden, weight, targets, 1.0)[0])
    chunked = saved_sizes(lambda: logprobs_from_hidden(hidden, weight, targets, chunk_size=8, unchunked_bytes=0))
    assert max(plain) >= 40 * 50
    assert max(chunked) < 8 * 50
    # under the byte threshold (40*50*4 bytes here) one piece whose logits autograd keeps: nothing recomputed
    whole = saved_sizes(lambda: logprobs_from_hidden(hidden, weight, targets, chunk_size=8, unchunked_bytes=40 * 50 * 4))
    assert max(whole) >= 40 * 50


def test_logprobs_from_hidden_no_grad_and_flat_input():
    """Under no_grad a flat (N, D) input works and equals the (B, T, D) result row for row."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 4, 5, generator=g)
    weight = torch.randn(7, 5, generator=g)
    targets = torch.randint(0, 7, (3, 4), generator=g)
    with torch.no_grad():
        flat = logprobs_from_hidden(hidden.reshape(12, 5), weight, targets.reshape(12), chunk_size=5)
    batched = logprobs_from_hidden(hidden, weight, targets, chunk_size=1024)
    torch.testing.assert_close(flat.reshape(3, 4), batched)
    assert not flat.requires_grad


def test_logprobs_from_hidden_rejects_bad_arguments():
    """A zero temperature or mismatched target shape is refused with a ValueError that names it."""
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="targets shape"):
        logprobs_from_hidden(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))


def test_logprobs_from_hidden_applies_the_family_transform_before_temperature():
    """hidden [2], weight rows [1], [0]: raw logits (2, 0); scale 0.5 -> (1, 0); softcap 1 -> (tanh 1, 0) =
    (0.761594, 0); temperature 2 -> (0.380797, 0);
    log p(0) = 0.380797 - log(1.463451 + 1) = 0.380797 - 0.901567 = -0.520770."""
    hidden = torch.tensor([[2.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    got = logprobs_from_hidden(hidden, weight, torch.tensor([0]), scale=0.5, softcap=1.0, temperature=2.0)
    z = math.tanh(1.0) / 2
    assert float(got[0]) == pytest.approx(z - math.log(math.exp(z) + 1), abs=1e-12)
    assert float(got[0]) == pytest.approx(-0.520770, abs=1e-5)
