"""SFT per-token NLL."""

import math

import torch

from posttrain.losses.sft import sft_loss


def test_sft_loss_hand_values():
    """log p = (ln 0.5, ln 0.25, -inf on padding), mask (1, 1, 0): NLL = (0.693147, 1.386294, 0); no NaN from -inf * 0."""
    logprobs = torch.tensor([[math.log(0.5), math.log(0.25), float("-inf")]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(sft_loss(logprobs, mask), torch.tensor([[math.log(2), math.log(4), 0.0]]))


def test_sft_loss_gradient_is_minus_mask():
    """d(sum NLL)/d logp = -1 on valid tokens and exactly 0 on masked ones (float 0/1 mask accepted)."""
    logprobs = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    sft_loss(logprobs, mask).sum().backward()
    torch.testing.assert_close(logprobs.grad, -mask)


def test_sft_loss_split_batch_and_padding_invariance():
    """Global-token normalisation: summing per-token losses of two half batches (each padded to its
    own width) and dividing by the global token count equals the whole batch's token mean."""
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 6, generator=g)
    lengths = torch.tensor([6, 2, 4, 1])
    mask = torch.arange(6) < lengths[:, None]
    whole = sft_loss(logprobs, mask).sum() / mask.sum()
    a = sft_loss(logprobs[:2], mask[:2]).sum()
    b = sft_loss(logprobs[2:, :4], mask[2:, :4]).sum()  # second half trimmed to its longest row
    torch.testing.assert_close((a + b) / mask.sum(), whole)
