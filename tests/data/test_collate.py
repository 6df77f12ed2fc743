"""Padding, packing and pair batches, checked through a real tiny Llama in float64."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.data import (
    ChatExample,
    PreferenceExample,
    collate_pairs,
    collate_prompts,
    collate_rankings,
    collate_sft,
    collate_shared_pairs,
    epoch_order,
    num_batches,
    pack_sft,
    prompt_order,
    tokenize_preference,
    tokenize_ranking,
    tokenize_sft,
    train_eval_split,
)
from posttrain.data.formats import RankingExample

IGNORE = -100


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return ChatExample([{"role": r, "content": c} for r, c in zip(roles, turns)])


CHATS = [chat("hi", "hello friend"), chat("What is 2 + 3 ?", "5"), chat("hi", "see you", "bye", "bye"),
         chat("a good film ?", "yes it was a great movie"), chat("one", "two three")]


def tiny_llama(vocab_size, attn):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).double()


def summed_nll(model, input_ids, labels, **kw):
    """Sum over targets of -log p(token t+1 | <= t): a sum, so packed and padded layouts are directly comparable."""
    logits = model(input_ids=input_ids, **kw).logits[:, :-1]  # (B, T-1, V)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")


def test_collate_sft_right_pads(tok):
    items = [tokenize_sft(tok, ex, "assistant", 64) for ex in CHATS[:2]]
    b = collate_sft(items, tok.pad_token_id)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert b.input_ids.shape == (2, max(n0, n1))
    short = 0 if n0 < n1 else 1
    n = min(n0, n1)
    assert (b.input_ids[short, n:] == tok.pad_token_id).all() and (b.labels[short, n:] == IGNORE).all()
    assert b.attention_mask.sum(1).tolist() == [n0, n1]
    assert b.position_ids[short, :n].tolist() == list(range(n))
    assert b.num_targets == sum(sum(x != IGNORE for x in it["labels"][1:]) for it in items)


def test_pack_sft_layout(tok):
    """Lengths 9, 13, 17, 16, 9 (loss_on all), rows of 32, first fit: 9 + 13 = 22 in row 1; 17 does not fit (39), row 2;
    16 fits neither (38, 33), row 3; the last 9 fits row 1 (31). With 2 rows per batch, row 2 (17) is filled to 31
    with a 14-token padding sequence (positions 0..13, no labels)."""
    items = [tokenize_sft(tok, ex, "all", 64) for ex in CHATS]
    packed = pack_sft(items, 32, pad_id=tok.pad_token_id, rows_per_batch=2)
    rows = [(b.input_ids[r], b.labels[r], b.position_ids[r]) for b in packed for r in range(b.input_ids.shape[0])]
    assert all(b.attention_mask is None and b.input_ids.shape[1] <= 32 for b in packed)
    assert [b.input_ids.shape for b in packed] == [(2, 31), (1, 16)]
    assert packed[0].position_ids[1].tolist() == list(range(17)) + list(range(14))
    starts = [(i, j) for i, (_, _, pos) in enumerate(rows) for j in range(len(pos)) if pos[j] == 0]
    # Every sequence start (items and padding tails) has label -100: no target crosses a boundary.
    assert all(rows[i][1][j] == IGNORE for i, j in starts)
    total_real = sum((lab != IGNORE).sum().item() for _, lab, _ in rows)
    assert total_real == sum(len(it["input_ids"]) - 1 for it in items)  # loss_on all: every token but the first


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packing_gives_the_same_loss_and_gradients(tok, attn):
    """Summed NLL and its gradients, packed (2 rows/batch, position-id resets, no attention_mask) vs right-padded,
    agree to 1e-10 in float64. loss_on=all makes each sequence's first token a label, which packing must mask."""
    model = tiny_llama(len(tok), attn)
    items = [tokenize_sft(tok, ex, "all", 64) for ex in CHATS]

    padded = collate_sft(items, tok.pad_token_id)
    model.zero_grad()
    loss_padded = summed_nll(model, padded.input_ids, padded.labels, attention_mask=padded.attention_mask,
                             position_ids=padded.position_ids, use_cache=False)
    loss_padded.backward()
    grads_padded = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    loss_packed = torch.zeros((), dtype=torch.float64)
    packed = pack_sft(items, 32, pad_id=tok.pad_token_id, rows_per_batch=2)
    assert len(packed) < len(items)  # something actually got packed together
    for b in packed:
        inputs = b.model_inputs()
        part = summed_nll(model, inputs.pop("input_ids"), b.labels, **inputs)
        part.backward()
        loss_packed = loss_packed + part.detach()
    assert torch.allclose(loss_packed, loss_padded.detach(), atol=1e-10, rtol=0)
    for g_pad, p in zip(grads_padded, model.parameters()):
        assert torch.allclose(p.grad, g_pad, atol=1e-10, rtol=0)


def pair_items(tok):
    prompts = [[{"role": "user", "content": "What is 2 + 3 ?"}], [{"role": "user", "content": "hi"}]]
    answers = [("5", "two three four"), ("hello friend see you", "no")]
    return [tokenize_preference(tok, PreferenceExample(p, [{"role": "assistant", "content": c}],
                                                       [{"role": "assistant", "content": r}]), 64)
            for p, (c, r) in zip(prompts, answers)]


def test_pairs_chosen_first_and_completion_mask_counts_completion_tokens(tok):
    items = pair_items(tok)
    b = collate_pairs(items, tok.pad_token_id)
    assert b.input_ids.shape[0] == 4 and b.completion_mask.shape == (4, b.input_ids.shape[1] - 1)
    lengths = [len(it["chosen_ids"]) for it in items] + [len(it["rejected_ids"]) for it in items]
    assert b.completion_mask.sum(1).tolist() == lengths  # "5 <|im_end|>" = 2, "two three four <|im_end|>" = 4, ...
    assert lengths == [2, 5, 4, 2]
    # Row 0 is prompt 0 + chosen 0; its mask is on targets P-1 .. P+C-2, i.e. tokens P .. P+C-1.
    p = len(items[0]["prompt_ids"])
    assert b.input_ids[0, p: p + 2].tolist() == items[0]["chosen_ids"]
    assert torch.nonzero(b.completion_mask[0]).flatten().tolist() == [p - 1, p]
    assert b.margin is None


def completion_logps(model, b):
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids,
                   use_cache=False).logits[:, :-1]  # (N, T-1, V)
    logp = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    return torch.where(b.completion_mask.bool(), logp, 0.0).sum(-1)  # (N,)


def test_left_and_right_padding_give_the_same_logps(tok):
    model = tiny_llama(len(tok), "sdpa")
    items = pair_items(tok)
    right = completion_logps(model, collate_pairs(items, tok.pad_token_id, "right"))
    left = completion_logps(model, collate_pairs(items, tok.pad_token_id, "left"))
    assert torch.isfinite(right).all()
    assert torch.allclose(left, right, atol=1e-10, rtol=0)
    alone = completion_logps(model, collate_pairs(items[:1], tok.pad_token_id))  # batch composition: no effect
    assert torch.allclose(alone, right[[0, 2]], atol=1e-10, rtol=0)


def values_and_grads(model, forward, loss=lambda out: out.sum()):
    """forward()'s output (detached) and the gradient of loss(output) on every parameter, from zeroed gradients."""
    model.zero_grad()
    out = forward()
    loss(out).backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_rows_give_the_pair_rows_logps_and_gradients(tok, attn):
    """One row per pair (prompt once, rejected masked from chosen, positions restarting after the prompt) gives each
    completion's summed log-prob, and its gradients, as the 2B prompt+completion rows. Float64, but Llama's RMSNorm
    (and eager's softmax) compute in float32: the prompt's gradient, one sum of two flows here and two separate
    flows there, rounds differently at 1e-7, so gradients agree to 1e-6 (values to 1e-10 with SDPA)."""
    from posttrain.models import token_logprobs_at

    model = tiny_llama(len(tok), attn)
    items = pair_items(tok)
    want, grads = values_and_grads(model, lambda: completion_logps(model, collate_pairs(items, tok.pad_token_id)))  # (4,)
    b = collate_shared_pairs(items, tok.pad_token_id)
    got, got_grads = values_and_grads(model, lambda: torch.where(
        b.target_mask.bool(), token_logprobs_at(model, b.input_ids, b.attention_mask, b.position_ids, b.source,
                                                b.targets), 0.0).sum(-1))  # (4,)
    assert torch.allclose(got, want, atol=1e-10 if attn == "sdpa" else 1e-6, rtol=0)
    for g_got, g in zip(got_grads, grads):
        assert torch.allclose(g_got, g, atol=1e-6, rtol=0)
    # by hand, pair 0: prompt P tokens, chosen 2, rejected 4; the rejected ones see the prompt and themselves only
    p, (c, r) = len(items[0]["prompt_ids"]), (2, 4)
    mask = b.attention_mask[0, 0]  # (L, L)
    assert b.input_ids.shape[0] == 2 and b.target_mask.sum(1).tolist() == [2, 5, 4, 2]
    assert b.position_ids[0, : p + c + r].tolist() == list(range(p + c)) + list(range(p, p + r))
    assert mask[p + c, :p].all() and not mask[p + c, p: p + c].any() and mask[p + c, p + c]
    assert b.source[2, :r].tolist() == [p - 1] + list(range(p + c, p + c + r - 1))  # rejected 0: from the prompt
    assert b.sequence_tokens == sum(2 * len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"])
                                    for it in items)


def shared_logps(model, b):
    from posttrain.models import token_logprobs_at

    logp = token_logprobs_at(model, b.input_ids, b.attention_mask, b.position_ids, b.source, b.targets)  # (2B, C)
    return torch.where(b.target_mask.bool(), logp, 0.0).sum(-1)  # (2B,)


def prefix_items(tok) -> tuple[list[int], list[dict]]:
    """The prompt and preference items of the shared-prefix tests: a 4-token shared prefix ("yes it was a"),
    identical completions, a rejected that is a prefix of the chosen, no shared token, no prompt."""
    ids = lambda text: tok.convert_tokens_to_ids(text.split())  # noqa: E731
    prompt = ids("<|im_start|> user a good film ? <|im_end|> <|im_start|> assistant")
    return prompt, [
        {"prompt_ids": prompt, "chosen_ids": ids("yes it was a great movie <|im_end|>"),
         "rejected_ids": ids("yes it was a bad film <|im_end|>")},  # shares 4
        {"prompt_ids": prompt[:3], "chosen_ids": ids("one two <|im_end|>"), "rejected_ids": ids("one two <|im_end|>")},
        {"prompt_ids": prompt, "chosen_ids": ids("no no maybe <|im_end|>"), "rejected_ids": ids("no no")},
        {"prompt_ids": prompt, "chosen_ids": ids("yes <|im_end|>"), "rejected_ids": ids("bad film <|im_end|>")},
        {"prompt_ids": [], "chosen_ids": ids("hi hello friend"), "rejected_ids": ids("hi see you")},
    ]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_prefix_shared_by_chosen_and_rejected_runs_once_with_the_pair_rows_logps_and_gradients(tok, attn):
    """Chosen and rejected that start alike ("yes it was a great movie" / "yes it was a bad film") run their common
    prefix once, as part of the prompt; each completion's summed log-prob and the gradients still equal those of
    the 2B separate padded prompt+completion rows (float64; tolerances as in the test above). Edge cases in the
    same batch: identical completions, a rejected that is a prefix of the chosen, no shared token, no prompt."""
    model = tiny_llama(len(tok), attn)
    prompt, items = prefix_items(tok)
    want, grads = values_and_grads(model, lambda: completion_logps(model, collate_pairs(items, tok.pad_token_id)))
    b = collate_shared_pairs(items, tok.pad_token_id)
    got, got_grads = values_and_grads(model, lambda: shared_logps(model, b))  # (2B,)
    assert torch.allclose(got, want, atol=1e-10 if attn == "sdpa" else 1e-6, rtol=0)
    for g_got, g in zip(got_grads, grads):
        assert torch.allclose(g_got, g, atol=1e-6, rtol=0)
    # the layout by hand: row 0 holds prompt, the 4 shared tokens, chosen's 3 others, rejected's 3 others
    p = len(prompt)
    assert b.input_ids.shape[1] == max(len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"]) - s
                                       for it, s in zip(items, [4, 3, 2, 0, 1]))
    assert b.position_ids[0, : p + 10].tolist() == list(range(p + 7)) + list(range(p + 4, p + 7))
    assert b.source[5, :7].tolist() == [p - 1, p, p + 1, p + 2, p + 3, p + 7, p + 8]  # rejected 0: 4 shared, then own
    assert b.source[0, :7].tolist() == list(range(p - 1, p + 6))
    mask = b.attention_mask[0, 0]  # (L, L)
    assert mask[p + 7, : p + 4].all() and not mask[p + 7, p + 4: p + 7].any()  # rejected: prompt + shared, no chosen
    width = b.input_ids.shape[1]
    assert b.source[6, :3].tolist() == [width + 2, width + 3, width + 4]  # identical completions: all shared
    assert b.target_mask[4].tolist()[:3] == [0, 1, 1] and b.target_mask[9].tolist()[:3] == [0, 1, 1]  # no prompt
    assert b.sequence_tokens == sum(2 * len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"])
                                    for it in items)


def test_rankings_make_all_k_choose_2_pairs(tok):
    """K=3 gives pairs (0,1), (0,2), (1,2); a preference item after it adds (3,4). 3 + 1 = 4 pairs."""
    prompt = [{"role": "user", "content": "hi"}]
    ranking = tokenize_ranking(tok, RankingExample(prompt, [[{"role": "assistant", "content": w}]
                                                            for w in ("great", "good", "bad")]), 64)
    b = collate_rankings([ranking, pair_items(tok)[0]], tok.pad_token_id)
    assert b.input_ids.shape[0] == 5
    assert b.pairs.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]] and b.pair_group.tolist() == [0, 0, 0, 1]


def test_prompts_are_left_padded(tok):
    b = collate_prompts([[5, 6, 7], [8]], tok.pad_token_id)
    assert b.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]] and b.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_prompt_order_walks_the_seeded_epoch_orders_end_to_end():
    """10 items, 4 per call: calls starting at 0, 4, .., 16 cover positions 0..19, i.e. epoch 0's order then epoch
    1's, every item once per epoch; the call at 8 takes the last 2 of epoch 0 and the first 2 of epoch 1."""
    first, second = epoch_order(10, shuffle=True, seed=1, epoch=0), epoch_order(10, shuffle=True, seed=1, epoch=1)
    calls = [prompt_order(10, 4, 4 * i, shuffle=True, seed=1) for i in range(5)]
    assert [x for c in calls for x in c] == first + second and sorted(first) == list(range(10)) and first != second
    assert calls[2] == first[8:] + second[:2]
    assert prompt_order(10, 3, 0, shuffle=False, seed=1) == [0, 1, 2]
    assert num_batches(10, 3) == 4 and num_batches(10, 3, drop_last=True) == 3


def test_train_eval_split():
    train, held = train_eval_split(list(range(20)), 0.1, seed=0)
    assert len(held) == 2 and sorted(train + held) == list(range(20))
    assert train_eval_split(list(range(20)), 0.1, seed=0) == (train, held)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_pair_rows_give_each_completion_its_own_rows_reward_and_gradients(tok, attn):
    """A reward model's score at each completion's last token (`last`) of the shared rows equals `sequence_scores` of
    the 2B separate padded prompt+completion rows, and so do the Bradley-Terry gradients (float64; tolerances as in
    the log-prob tests above). Same edge cases: a shared prefix, identical completions, a rejected that is a prefix
    of the chosen (its last token sits in the shared run), no shared token, no prompt."""
    from transformers import LlamaForSequenceClassification

    from posttrain.losses import bradley_terry_loss
    from posttrain.models import sequence_scores, sequence_scores_at

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn, num_labels=1, pad_token_id=tok.pad_token_id)
    rm = LlamaForSequenceClassification(config).double()
    prompt, items = prefix_items(tok)
    pairs = collate_pairs(items, tok.pad_token_id)
    bt = lambda r: bradley_terry_loss(r[:5], r[5:])[0].sum()  # noqa: E731  (chosen then rejected)
    want, grads = values_and_grads(rm, lambda: sequence_scores(rm, pairs.input_ids, pairs.attention_mask), bt)  # (2B,)
    b = collate_shared_pairs(items, tok.pad_token_id)
    got, got_grads = values_and_grads(
        rm, lambda: sequence_scores_at(rm, b.input_ids, b.attention_mask, b.position_ids, b.last), bt)  # (2B,)
    assert torch.allclose(got, want, atol=1e-10 if attn == "sdpa" else 1e-6, rtol=0)
    for g_got, g in zip(got_grads, grads):
        assert torch.allclose(g_got, g, atol=1e-6, rtol=0)
    width, p = b.input_ids.shape[1], len(prompt)
    assert b.last[0] == p + 6 and b.last[5] == p + 9  # pair 0: 4 shared + 3 chosen; rejected's 3 after them
    assert b.last[7] == 2 * width + p + 1  # pair 2's rejected "no no" ends inside the shared run
    assert got[1] == got[6]  # identical completions read the same position
