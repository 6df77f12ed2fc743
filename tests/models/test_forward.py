"""token_logprobs / token_values / sequence_scores against the model's own full-logit forward."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from posttrain.config import LoraConfig
from posttrain.data import positions_from_mask
from posttrain.models import forward as forward_module
from posttrain.models import (
    apply_lora,
    last_token_index,
    load_causal_lm,
    load_sequence_classifier,
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
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    logp = F.log_softmax(logits[:, :-1].double() / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def test_position_ids_and_last_index_by_hand():
    """mask [0,0,1,1,1] -> positions [0,0,0,1,2], last index 4; mask [1,1,0,0,0] -> [0,1,1,1,1], last 1."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 1, 1, 1]]
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
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, :-1] / 0.7
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
        hidden = critic.model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).last_hidden_state  # (B, T, D)
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
def test_packed_rows_run_padding_free_with_the_padded_values_and_gradients(tiny_dir, checkpointing, monkeypatch):
    """ROWS packed as [row0 | row1] and [row2 | a 4-token fill] (no mask, positions restarting at 0) take the
    per-sequence attention path in every layer's forward and, under gradient checkpointing, again in every layer's
    recomputation in the backward pass (4 layers: 4 calls, or 4 + 4): log-probs inside each sequence and the summed
    gradients equal the right-padded batch's in float64, and the model's attention setting is left as it was."""
    model = load_causal_lm(tiny_dir, dtype="float32", device="cpu", gradient_checkpointing=checkpointing).double()
    model.train()
    ids, mask = pad_batch(ROWS, "right")
    padded = token_logprobs(model, ids, mask)  # (3, 5)
    inside = [padded[i, : len(r) - 1] for i, r in enumerate(ROWS)]
    (sum(x.sum() for x in inside)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    calls = []
    per_sequence = forward_module._varlen_attention
    monkeypatch.setattr(forward_module, "_varlen_attention", lambda *a, **kw: calls.append(1) or per_sequence(*a, **kw))
    packed_ids = torch.tensor([ROWS[0] + ROWS[1], ROWS[2] + [PAD] * 4])  # (2, 9)
    positions = torch.tensor([list(range(6)) + list(range(3)), list(range(5)) + list(range(4))])
    packed = token_logprobs(model, packed_ids, None, positions)  # (2, 8)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers
    spans = [packed[0, 0:5], packed[0, 6:8], packed[1, 0:4]]  # a sequence's last position predicts the next one's
    for got, want in zip(spans, inside):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    (sum(x.sum() for x in spans)).backward()
    assert len(calls) == (2 * layers if checkpointing else layers)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, atol=1e-10, rtol=0)
    assert model.config._attn_implementation == forward_module.PACKED_SDPA


def test_packed_attention_leaves_other_sdpa_calls_unchanged(tiny_dir, monkeypatch):
    """Under its own name the per-sequence dispatch runs transformers' own SDPA function for every call without
    segments: a padded batch's logits equal those of the same model switched to plain "sdpa", bit for bit. A
    packed batch on plain "sdpa" takes the block-diagonal mask, with the per-sequence path's log-probs."""
    model = load_causal_lm(tiny_dir, dtype=torch.float64, device="cpu")
    assert model.config._attn_implementation == forward_module.PACKED_SDPA
    ids, mask = pad_batch(ROWS, "left")
    packed_ids = torch.tensor([ROWS[0] + ROWS[1], ROWS[2] + [PAD] * 4])  # (2, 9)
    positions = torch.tensor([list(range(6)) + list(range(3)), list(range(5)) + list(range(4))])
    calls = []
    per_sequence = forward_module._varlen_attention
    monkeypatch.setattr(forward_module, "_varlen_attention", lambda *a, **kw: calls.append(1) or per_sequence(*a, **kw))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        ours_packed = token_logprobs(model, packed_ids, None, positions)
        assert len(calls) == model.config.num_hidden_layers
        model.set_attn_implementation("sdpa")
        theirs = model(input_ids=ids, attention_mask=mask).logits
        theirs_packed = token_logprobs(model, packed_ids, None, positions)
    assert torch.equal(ours, theirs)
    assert len(calls) == model.config.num_hidden_layers  # no per-sequence call on plain "sdpa"
    torch.testing.assert_close(ours_packed, theirs_packed, atol=1e-10, rtol=0)


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps from fn()'s forward for the backward pass, seen by a
    saved-tensors hook around the whole call (inside a checkpointed layer, checkpointing's own hook takes over)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_gradient_checkpointing_keeps_less_for_the_backward_on_packed_rows(tiny_dir):
    """Two packed rows of 3 x 40 tokens: with checkpointing the forward leaves less than half the activation bytes
    for the backward (the layers' insides are recomputed), on the same per-sequence attention path."""
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 120))  # (2, 120)
    positions = torch.arange(40).repeat(3).expand(2, -1)  # (2, 120): three sequences a row
    kept = {}
    for checkpointing in (False, True):
        model = load_causal_lm(tiny_dir, dtype="float32", device="cpu", gradient_checkpointing=checkpointing)
        model.train()
        kept[checkpointing] = saved_bytes(lambda: token_logprobs(model, ids, None, positions).sum())
    assert kept[True] < 0.5 * kept[False]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_rows_on_eager_attention_take_the_block_diagonal_mask(tiny_dir, checkpointing, monkeypatch):
    """Eager attention keeps its own function (no per-sequence dispatch is registered for it): a packed batch gets
    the block-diagonal mask transformers builds from the position resets, with the padded batch's log-probs (to
    1e-6: eager's softmax runs in float32 even on a float64 model, over rows of another width)."""
    model = load_causal_lm(tiny_dir, dtype="float32", device="cpu", attn_implementation="eager",
                           gradient_checkpointing=checkpointing).double()
    model.train()
    calls = []
    per_sequence = forward_module._varlen_attention
    monkeypatch.setattr(forward_module, "_varlen_attention", lambda *a, **kw: calls.append(1) or per_sequence(*a, **kw))
    ids, mask = pad_batch(ROWS, "right")
    padded = token_logprobs(model, ids, mask)  # (3, 5)
    packed_ids = torch.tensor([ROWS[0] + ROWS[1], ROWS[2] + [PAD] * 4])  # (2, 9)
    positions = torch.tensor([list(range(6)) + list(range(3)), list(range(5)) + list(range(4))])
    packed = token_logprobs(model, packed_ids, None, positions)  # (2, 8)
    spans = [packed[0, 0:5], packed[0, 6:8], packed[1, 0:4]]
    for got, i in zip(spans, range(3)):
        torch.testing.assert_close(got, padded[i, : len(ROWS[i]) - 1], atol=1e-6, rtol=0)
    packed.sum().backward()
    assert not calls and model.config._attn_implementation == "eager"
