"""Batches: typed containers of tensors, padding, packing, and a deterministic batch order.

Conventions: `labels` are aligned with `input_ids` (-100 = no loss) and shifted in the loss (position t predicts
token t+1). Masks that describe *targets* (`PairBatch.completion_mask`) are already shifted: width T-1, entry t
is about token t+1, the same layout as `models.token_logprobs(...) -> (B, T-1)`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from posttrain.data.tokenize import IGNORE


def _pad(rows: Sequence[Sequence[int]], value: int, side: str = "right", width: int | None = None) -> torch.Tensor:
    width = max(len(r) for r in rows) if width is None else width
    # one tensor from padded lists: a copy per row costs more than the rows themselves at these sizes
    rows = [r.tolist() if isinstance(r, torch.Tensor) else list(r) for r in rows]
    padded = [r + [value] * (width - len(r)) if side == "right" else [value] * (width - len(r)) + r for r in rows]
    return torch.tensor(padded, dtype=torch.long).reshape(len(rows), width)  # (N, width)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so a left-padded row sees the same positions as a right-padded
    one (0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


@dataclass
class SFTBatch:
    """input_ids (B, T), labels (B, T) with -100 = no loss, attention_mask (B, T) or None, position_ids (B, T).

    A packed batch has `attention_mask=None`: its rows hold several sequences and `position_ids` restart at 0 at
    each one. Transformers then builds a block-diagonal causal mask from the position resets
    (`masking_utils.find_packed_sequence_indices`; flash-attention uses them as varlen boundaries) — but only when
    the forward gets no KV cache, so call the model with `use_cache=False` (`model_inputs()` does)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor

    @property
    def num_targets(self) -> int:
        """Tokens in the loss: labelled positions 1..T-1 (position 0 has nothing before it to predict it)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids, "use_cache": False}

    def to(self, device: torch.device | str) -> "SFTBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SFTBatch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.position_ids))


def collate_sft(items: Sequence[dict], pad_id: int) -> SFTBatch:
    """Right-padded batch of `tokenize_sft` items; padding has label -100 and attention 0."""
    input_ids = _pad([it["input_ids"] for it in items], pad_id)  # (B, T)
    labels = _pad([it["labels"] for it in items], IGNORE)  # (B, T)
    attention_mask = _pad([[1] * len(it["input_ids"]) for it in items], 0)  # (B, T)
    return SFTBatch(input_ids, labels, attention_mask, positions_from_mask(attention_mask))


def pack_sft(items: Sequence[dict], max_length: int, *, pad_id: int = 0, rows_per_batch: int = 1) -> list[SFTBatch]:
    """Greedy first-fit packing of `tokenize_sft` items into rows of at most `max_length` tokens (item order is
    kept within a row), grouped `rows_per_batch` rows per batch.

    Each sequence gets position ids 0..n-1 and its first label is -100, so no position predicts a token of the next
    sequence; with the block-diagonal mask (see `SFTBatch`) the loss and gradients equal the unpacked batch's.
    Rows shorter than the batch's longest are filled with `pad_id` as one more sequence (own positions, no labels).
    """
    rows: list[list[dict]] = []
    room: list[int] = []
    for it in items:
        n = len(it["input_ids"])
        if n > max_length:
            raise ValueError(f"an item of {n} tokens is longer than max_length={max_length}; tokenize with max_length")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(it)
                room[r] -= n
                break
        else:
            rows.append([it])
            room.append(max_length - n)
    batches = []
    for b in range(0, len(rows), rows_per_batch):
        group = rows[b: b + rows_per_batch]
        width = max(sum(len(it["input_ids"]) for it in row) for row in group)
        ids, labels, pos = [], [], []
        for row in group:
            r_ids, r_lab, r_pos = [], [], []
            for it in row:
                n = len(it["input_ids"])
                r_ids += list(it["input_ids"])
                r_lab += [IGNORE] + list(it["labels"][1:])
                r_pos += list(range(n))
            fill = width - len(r_ids)
            ids.append(r_ids + [pad_id] * fill)
            labels.append(r_lab + [IGNORE] * fill)
            pos.append(r_pos + list(range(fill)))
        batches.append(SFTBatch(torch.tensor(ids), torch.tensor(labels), None, torch.tensor(pos)))  # (R, W) each
    return batches


@dataclass
class PairBatch:
    """Chosen rows then rejected rows, for one concatenated forward.

    input_ids (2B, T), attention_mask (2B, T), position_ids (2B, T) counting real tokens only;
    completion_mask (2B, T-1): 1 where *target* t (token t+1, predicted at position t) is a completion token —
    multiply with `token_logprobs(...)` (2B, T-1) and sum over T-1 for a completion's log-probability;
    margin (B,) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    position_ids: torch.Tensor
    margin: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device),
                         self.position_ids.to(device), None if self.margin is None else self.margin.to(device))


def _sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int, padding_side: str):
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    in_completion = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    input_ids = _pad(seqs, pad_id, padding_side)  # (N, T)
    attention_mask = _pad([[1] * len(s) for s in seqs], 0, padding_side)  # (N, T)
    token_is_completion = _pad(in_completion, 0, padding_side)  # (N, T)
    return input_ids, attention_mask, token_is_completion[:, 1:], positions_from_mask(attention_mask)


def collate_pairs(items: Sequence[dict], pad_id: int, padding_side: str = "right") -> PairBatch:
    """Batch `tokenize_preference` items: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected."""
    prompts = [it["prompt_ids"] for it in items] * 2
    completions = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    input_ids, attention_mask, completion_mask, position_ids = _sequences(prompts, completions, pad_id, padding_side)
    margins = [it.get("margin") for it in items]
    margin = None if all(m is None for m in margins) else torch.tensor([m or 0.0 for m in margins])  # (B,)
    return PairBatch(input_ids, attention_mask, completion_mask, position_ids, margin)


@dataclass
class SharedPromptPairs:
    """B preference pairs, ONE row each: prompt, chosen, rejected, right-padded to L — the prompt runs once.

    The rejected tokens attend to the prompt and to themselves, never to the chosen ones, and their positions
    continue from the prompt's end, so every completion token sees exactly the context it has in its own
    prompt+completion row (`collate_pairs`): the same log-probs for 2P + C_w + C_l tokens' worth of sequences
    from P + C_w + C_l forward tokens. A prefix that chosen and rejected share (S tokens: a template, "The answer
    is") runs once too: it is laid out as part of the prompt and the rejected log-probs of its tokens are read
    from the same positions as the chosen ones (equal context, equal token), so a row holds P + C_w + C_l - S.

    input_ids (B, L); attention_mask (B, 1, L, L) bool, True = may attend (a pad attends to itself only);
    position_ids (B, L); source (2B, C): index into the flattened (B * L) positions of the hidden state that
    predicts each completion token (rows 0..B-1 chosen, B..2B-1 rejected, as `PairBatch`); targets (2B, C) the
    completion tokens; target_mask (2B, C) 1 on real ones; margin (B,) or None; sequence_tokens: the tokens of
    the 2B prompt+completion sequences the pairs stand for; last (2B,): index into the flattened positions of each
    completion's last token, where a reward model reads its score (its hidden state has seen exactly the
    prompt+completion row)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    source: torch.Tensor
    targets: torch.Tensor
    target_mask: torch.Tensor
    margin: torch.Tensor | None
    sequence_tokens: int
    last: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "SharedPromptPairs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SharedPromptPairs(move(self.input_ids), move(self.attention_mask), move(self.position_ids),
                                 move(self.source), move(self.targets), move(self.target_mask), move(self.margin),
                                 self.sequence_tokens, move(self.last))


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def shared_pair_length(item: dict) -> int:
    """Tokens of a `tokenize_preference` item's `SharedPromptPairs` row: P + C_w + C_l - S."""
    return (len(item["prompt_ids"]) + len(item["chosen_ids"]) + len(item["rejected_ids"])
            - _shared_prefix(item["chosen_ids"], item["rejected_ids"]))


def collate_shared_pairs(items: Sequence[dict], pad_id: int) -> SharedPromptPairs:
    """Batch `tokenize_preference` items as `SharedPromptPairs` (one row per pair, the prompt and the completions'
    shared prefix once)."""
    shared = [_shared_prefix(it["chosen_ids"], it["rejected_ids"]) for it in items]
    width = max(shared_pair_length(it) for it in items)
    rows, segs, pos = [], [], []
    chosen, rejected = ([], [], []), ([], [], [])  # (sources, targets, valid) per completion
    last = ([], [])  # flattened position of each chosen / rejected completion's last token
    for b, (it, s) in enumerate(zip(items, shared)):
        p, c, r = list(it["prompt_ids"]), list(it["chosen_ids"]), list(it["rejected_ids"])
        head = len(p) + s  # prompt + shared prefix: seen by both completions
        rows.append(p + c + r[s:])
        segs.append([0] * head + [1] * (len(c) - s) + [2] * (len(r) - s))
        pos.append(list(range(len(p) + len(c))) + list(range(head, len(p) + len(r))))
        # where each completion token sits in the flattened batch; a shared one sits once, in the chosen run
        start = b * width + len(p)
        at_c = [start + k for k in range(len(c))]
        at_r = at_c[:s] + [start + len(c) + k for k in range(len(r) - s)]
        # token k is predicted at the position of token k-1: the prompt's last token for k = 0
        # (with no prompt, token 0 has no predictor and is left out, as in collate_pairs)
        for ends, at in zip(last, (at_c, at_r)):
            ends.append(at[-1] if at else max(start - 1, 0))  # an empty completion: the prompt's last token
        for (src, tgt, ok), tokens, at in ((chosen, c, at_c), (rejected, r, at_r)):
            src.append(([start - 1] + at)[: len(tokens)])
            tgt.append(tokens)
            ok.append([int(k > 0 or len(p) > 0) for k in range(len(tokens))])
    input_ids = _pad(rows, pad_id, width=width)  # (B, L)
    seg = _pad(segs, -1, width=width)  # (B, L): 0 prompt and shared prefix, 1 chosen, 2 rejected, -1 pad
    real = seg >= 0
    q, k = seg[:, :, None], seg[:, None, :]  # (B, L, 1), (B, 1, L)
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & real[:, :, None] & real[:, None, :]  # (B, L, L)
    allowed &= ~((q == 2) & (k == 1))  # rejected never sees chosen
    allowed |= torch.eye(width, dtype=torch.bool) & ~real[:, :, None]  # a pad attends to itself: no empty row
    margins = [it.get("margin") for it in items]
    margin = None if all(m is None for m in margins) else torch.tensor([m or 0.0 for m in margins])  # (B,)
    n_seq = sum(2 * len(it["prompt_ids"]) + len(it["chosen_ids"]) + len(it["rejected_ids"]) for it in items)
    return SharedPromptPairs(input_ids, allowed[:, None], _pad(pos, 0, width=width),
                             _pad(chosen[0] + rejected[0], 0).clamp(min=0),  # (2B, C)
                             _pad(chosen[1] + rejected[1], pad_id), _pad(chosen[2] + rejected[2], 0), margin, n_seq,
                             torch.tensor(last[0] + last[1]))  # (2B,)


@dataclass
class RankingBatch:
    """All responses of B ranked examples, one row each: input_ids, attention_mask, position_ids (N, T),
    completion_mask (N, T-1) as in `PairBatch`; pairs (P, 2) row indices (better, worse) for every one of the
    K-choose-2 pairs of each example; pair_group (P,) the example each pair comes from, so a loss can weight each
    example's pairs by 1/C(K,2) (InstructGPT, Ouyang et al. 2022 Sec. 3.5); margin (P,) the `margin` of a
    preference item for its one pair (0 for ranking pairs), or None when no item has one."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    position_ids: torch.Tensor
    pairs: torch.Tensor
    pair_group: torch.Tensor
    margin: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "RankingBatch":
        return RankingBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device),
                            self.position_ids.to(device), self.pairs.to(device), self.pair_group.to(device),
                            None if self.margin is None else self.margin.to(device))


def collate_rankings(items: Sequence[dict], pad_id: int, padding_side: str = "right") -> RankingBatch:
    """Batch `tokenize_ranking` items (or preference items, as rankings of two)."""
    prompts, completions, pairs, group, margins = [], [], [], [], []
    for g, it in enumerate(items):
        responses = it["response_ids"] if "response_ids" in it else [it["chosen_ids"], it["rejected_ids"]]
        first = len(completions)
        for r in responses:
            prompts.append(it["prompt_ids"])
            completions.append(r)
        for a in range(len(responses)):
            for b in range(a + 1, len(responses)):
                pairs.append((first + a, first + b))
                group.append(g)
                margins.append(it.get("margin"))
    input_ids, attention_mask, completion_mask, position_ids = _sequences(prompts, completions, pad_id, padding_side)
    margin = None if all(m is None for m in margins) else torch.tensor([m or 0.0 for m in margins])  # (P,)
    return RankingBatch(input_ids, attention_mask, completion_mask, position_ids, torch.tensor(pairs),
                        torch.tensor(group), margin)


@dataclass
class ClassificationBatch:
    """input_ids (B, T) right-padded, attention_mask (B, T), labels (B,) class ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> "ClassificationBatch":
        return ClassificationBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate_classification(items: Sequence[dict], pad_id: int) -> ClassificationBatch:
    input_ids = _pad([it["input_ids"] for it in items], pad_id)  # (B, T)
    attention_mask = _pad([[1] * len(it["input_ids"]) for it in items], 0)  # (B, T)
    return ClassificationBatch(input_ids, attention_mask, torch.tensor([it["label"] for it in items]))


@dataclass
class PromptBatch:
    """Prompts left-padded for generation: input_ids (B, P), attention_mask (B, P), position_ids (B, P); the
    prompts all end at column P-1, so sampled tokens line up from column P."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def collate_prompts(prompts: Sequence[Sequence[int] | dict], pad_id: int) -> PromptBatch:
    rows = [p["input_ids"] if isinstance(p, dict) else p for p in prompts]
    input_ids = _pad(rows, pad_id, "left")  # (B, P)
    attention_mask = _pad([[1] * len(r) for r in rows], 0, "left")  # (B, P)
    return PromptBatch(input_ids, attention_mask, positions_from_mask(attention_mask))


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """Item order of one epoch: a function of (seed, epoch) only, so a resumed run sees the same order."""
    order = list(range(n))
    if shuffle:
        random.Random(f"posttrain-data-{seed}-{epoch}").shuffle(order)
    return order


def prompt_order(n: int, count: int, start: int, *, shuffle: bool, seed: int) -> list[int]:
    """Positions start .. start+count-1 of the concatenated epoch orders of n items: an online run's prompts of one
    iteration or round, every prompt once before any repeats, a function of (seed, start) only (resume-exact)."""
    out, position = [], start
    while len(out) < count:
        epoch, offset = divmod(position, n)
        take = epoch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)[offset: offset + count - len(out)]
        out, position = out + take, position + len(take)
    return out


def num_batches(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def train_eval_split(items: Sequence[Any], fraction: float, *, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `fraction` of the items (at least one when fraction > 0) in a seeded order (`data.eval_split`)."""
    if fraction <= 0:
        return list(items), []
    order = epoch_order(len(items), shuffle=True, seed=seed, epoch=-1)
    k = max(1, int(round(fraction * len(items))))
    held = set(order[:k])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
