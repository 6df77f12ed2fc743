"""token_logprobs / token_values / sequence_scores against the model's own full-logit forward."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from posttrain.config import LoraConfig
from posttrain.models import (
    apply_lora,
    last_token_index,
    load_causal_lm,
    load_sequence_classifier,
    position_ids_from_mask,
    sequence_scores,
    token_logprobs,
    token_values,
)

PAD = 0
ROWS = [[5, 9, 13, 2, 44, 7], [11, 3, 8], [20, 21, 22, 23, 24]]


def pad_batch(rows, side):
    """(B, T) ids and mask, padded with PAD on `side`."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return ids, mask


def reference_logprobs(model, ids, mask, temperature=1.0):
    """log_softmax(full logits / T) gathered at the next token: (B, T-1)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logp = F.log_softmax(logits[:, :-1].double() / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_position_ids_and_last_index_by_hand():
    """mask [0,0,1,1,1] -> positions [0,0,0,1,2], last index 4; mask [1,1,0,0,0] -> [0,1,1,1,1], last 1."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 1, 1, 1]]
    assert last_token_index(mask).tolist() == [4, 1]


def test_token_logprobs_equal_full_log_softmax_float64(tiny_dir):
    model = load_causal_lm(tiny_dir, dtype=torch.float64, device="cpu")
    for side in ("right", "left"):
        ids, mask = pad_batch(ROWS, side)
        valid = (mask[:, 1:] * mask[:, :-1]).bool()  # both the position and its target are real tokens
        with torch.no_grad():
            got = token_logprobs(model, ids, mask, chunk_size=4)  # chunks smaller than B*(T-1)
            want = reference_logprobs(model, ids, mask)
        assert got.shape == (3, 5) and got.dtype == torch.float64
        torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-12)


def test_token_logprobs_temperature_and_entropy(tiny_dir):
    """Entropy of softmax(z / T) = -sum p log p, computed here from the full logits."""
    model = load_causal_lm(tiny_dir, dtype=torch.float64, device="cpu")
    ids, mask = pad_batch(ROWS, "right")
    with torch.no_grad():
        logp, entropy = token_logprobs(model, ids, mask, temperature=0.7, return_entropy=True)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits[:, :-1] / 0.7
        full = F.log_softmax(logits, dim=-1)
    torch.testing.assert_close(logp, full.gather(-1, ids[:, 1:, None]).squeeze(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1), rtol=0, atol=1e-12)


def test_left_padding_equals_unpadded_rows(tiny_dir):
    model = load_causal_lm(tiny_dir, dtype=torch.float64, device="cpu")
    ids, mask = pad_batch(ROWS, "left")
    with torch.no_grad():
        batch = token_logprobs(model, ids, mask)
        for i, row in enumerate(ROWS):
            alone = token_logprobs(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
            torch.testing.assert_close(batch[i, -(len(row) - 1) :], alone, rtol=0, atol=1e-12)


def test_token_logprobs_through_lora_and_gradients(tiny_dir):
    lora = apply_lora(load_causal_lm(tiny_dir, device="cpu"), LoraConfig(r=4, alpha=8), "causal_lm")
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    ids, mask = pad_batch(ROWS, "right")
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    got = token_logprobs(lora, ids, mask)
    with torch.no_grad():
        want = reference_logprobs(lora, ids, mask).float()
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-5)
    got[valid].sum().backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_token_values_are_the_head_on_every_position(tiny_dir):
    critic = load_sequence_classifier(tiny_dir, num_labels=1, dtype=torch.float64, device="cpu")
    ids, mask = pad_batch(ROWS, "right")
    with torch.no_grad():
        values = token_values(critic, ids, mask)  # (B, T)
        hidden = critic.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state  # (B, T, D)
    assert values.shape == ids.shape
    torch.testing.assert_close(values, (hidden @ critic.score.weight.T).squeeze(-1).float(), rtol=0, atol=1e-6)


def test_sequence_scores_match_hf_pooling_and_ignore_padding_side(tiny_dir):
    """HF's classifier reads the last non-pad token through config.pad_token_id; ours uses the mask.
    Left and right padding must agree (float64, 1e-10)."""
    rm = load_sequence_classifier(tiny_dir, num_labels=1, dtype=torch.float64, device="cpu")
    rm.config.pad_token_id = PAD
    right_ids, right_mask = pad_batch(ROWS, "right")
    left_ids, left_mask = pad_batch(ROWS, "left")
    with torch.no_grad():
        right = sequence_scores(rm, right_ids, right_mask)
        left = sequence_scores(rm, left_ids, left_mask)
        hf = rm(input_ids=right_ids, attention_mask=right_mask).logits.squeeze(-1)
    assert right.shape == (3,)
    torch.testing.assert_close(left, right, rtol=0, atol=1e-10)
    torch.testing.assert_close(right, hf.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_run_padding_free_with_the_padded_values_and_gradients(tiny_dir, checkpointing):
    """ROWS packed as [row0 | row1] and [row2 | a 4-token fill] (no mask, positions restarting at 0) take the
    per-sequence attention path (the block-diagonal mask under gradient checkpointing, whose recomputation runs
    later): log-probs inside each sequence and the summed gradients equal the right-padded batch's in float64,
    and the model's attention setting is left as it was."""
    model = load_causal_lm(tiny_dir, dtype="float32", device="cpu", gradient_checkpointing=checkpointing).double()
    model.train()
    ids, mask = pad_batch(ROWS, "right")
    padded = token_logprobs(model, ids, mask)  # (3, 5)
    inside = [padded[i, : len(r) - 1] for i, r in enumerate(ROWS)]
    (sum(x.sum() for x in inside)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    packed_ids = torch.tensor([ROWS[0] + ROWS[1], ROWS[2] + [PAD] * 4])  # (2, 9)
    positions = torch.tensor([list(range(6)) + list(range(3)), list(range(5)) + list(range(4))])
    packed = token_logprobs(model, packed_ids, None, positions)  # (2, 8)
    spans = [packed[0, 0:5], packed[0, 6:8], packed[1, 0:4]]  # a sequence's last position predicts the next one's
    for got, want in zip(spans, inside):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    (sum(x.sum() for x in spans)).backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-10, rtol=0)
    assert model.config._attn_implementation == "sdpa"
