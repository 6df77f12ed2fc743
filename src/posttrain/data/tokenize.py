"""Chat templates, tokenisation and label masking.

Labels are aligned with `input_ids` (HF convention, -100 = no loss); the shift happens in the loss: position t
predicts token t+1, so `labels[0]` never counts.

Label masking renders prefixes of the conversation with the chat template: for assistant turn i, the text of
`messages[:i]` with the generation prompt ends where the reply starts, and the text of `messages[:i+1]` ends after
the reply's end-of-turn marker. The characters from the first to just after the EOS text are the reply; tokens
whose first character falls inside a reply get labels. This works for any template that renders a conversation's
prefix as a prefix of its text (ChatML, Llama 3, Qwen, Mistral ...), with no template-specific markers.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.formats import (
    ChatExample,
    ClassificationExample,
    DataStats,
    Example,
    Message,
    PreferenceExample,
    RankingExample,
    TextExample,
    UnpairedExample,
)
from posttrain.errors import DataError

IGNORE = -100
LOSS_ON = ("assistant", "completion", "all")

# ChatML (OpenAI; used by Qwen and others): <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}


def resolve_chat_template(tokenizer: Any, name: str = "auto") -> str:
    """`auto`: the tokenizer's own template, else ChatML; a built-in name (`chatml`); any other string is taken as
    a Jinja template."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        return own or CHATML_TEMPLATE
    return BUILTIN_TEMPLATES.get(name, name)


def render(tok: Any, messages: list[Message], *, add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's template (ChatML when it has none)."""
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                   chat_template=resolve_chat_template(tok, "auto"))


def _encode(tok: Any, text: str) -> tuple[list[int], list[int] | None]:
    """Token ids and each token's first character offset (None for slow tokenizers). The template already holds
    any BOS, so no special tokens are added."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [start for start, _ in enc["offset_mapping"]]
    return list(tok(text, add_special_tokens=False)["input_ids"]), None


def _eos_after_reply(segment: str, content: str, eos: str) -> int:
    """Where the EOS that ends the reply starts in `segment` (the reply as rendered), or -1.

    The first EOS after the reply's text, not the last one in the segment: a template that also writes
    `eos_token` after the whole conversation (Phi-3: `<|end|>` as end of turn, then eos_token) would otherwise
    put the text between the two into the reply."""
    if not eos:
        return -1
    at = segment.find(content) if content else -1
    k = segment.find(eos, at + len(content) if at >= 0 else 0)
    return k if k >= 0 else segment.rfind(eos)


def _reply_spans(tok: Any, messages: list[Message], full: str, which: list[int]) -> list[tuple[int, int]]:
    """Character spans [start, end) of the assistant replies `which`, each through its EOS text when present."""
    eos = tok.eos_token or ""
    spans, cursor = [], 0
    for i in which:
        before = render(tok, messages[:i], add_generation_prompt=True)
        upto = render(tok, messages[: i + 1])
        if full.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            start, segment = len(before), upto[len(before):]
            k = _eos_after_reply(segment, messages[i]["content"], eos)
            end = start + k + len(eos) if k >= 0 else len(upto)
        else:
            # Templates that rewrite earlier turns: find the reply's text itself, then its EOS right after.
            start = full.find(messages[i]["content"], cursor)
            if start < 0:
                raise DataError(f"the chat template does not render assistant turn {i} verbatim; cannot mask labels")
            end = start + len(messages[i]["content"])
            if eos and full.startswith(eos, end):
                end += len(eos)
        spans.append((start, end))
        cursor = end
    return spans


def _labels_from_spans(tok: Any, full: str, ids: list[int], offsets: list[int] | None,
                       spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE] * len(ids)
    if offsets is None:  # slow tokenizer: token boundaries from tokenising each text prefix
        for start, end in spans:
            a = len(tok(full[:start], add_special_tokens=False)["input_ids"])
            b = len(tok(full[:end], add_special_tokens=False)["input_ids"])
            labels[a:b] = ids[a:b]
        return labels
    for j, off in enumerate(offsets):
        if any(start <= off < end for start, end in spans):
            labels[j] = ids[j]
    return labels


def _num_targets(labels: list[int]) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE)


def tokenize_sft(tok: Any, ex: ChatExample | TextExample, loss_on: str, max_length: int) -> dict | None:
    """`{"input_ids", "labels", "truncated"}` (lists of equal length), or None when the example is dropped
    because nothing to learn is left within `max_length` (its prompt alone fills it).

    loss_on: `assistant` labels every assistant turn, `completion` only the last one, `all` every token.
    The EOS (end-of-turn) token is always labelled: when the template's replies do not contain it, it is appended
    after the conversation, so the model learns to stop. Truncation cuts the end (the completion side)."""
    if loss_on not in LOSS_ON:
        raise DataError(f"unknown loss_on {loss_on!r}; expected one of {', '.join(LOSS_ON)}")
    eos_id = tok.eos_token_id
    if isinstance(ex, TextExample):
        ids = list(tok(ex.text, add_special_tokens=True)["input_ids"])
        if eos_id is not None and (not ids or ids[-1] != eos_id):
            ids.append(eos_id)
        labels = list(ids)
    else:
        full = render(tok, ex.messages)
        ids, offsets = _encode(tok, full)
        if loss_on == "all":
            labels = list(ids)
        else:
            turns = [i for i, m in enumerate(ex.messages) if m["role"] == "assistant"]
            if loss_on == "completion":
                turns = turns[-1:]
            labels = _labels_from_spans(tok, full, ids, offsets, _reply_spans(tok, ex.messages, full, turns))
        if eos_id is not None and eos_id not in [x for x in labels if x != IGNORE]:
            ids.append(eos_id)
            labels.append(eos_id)
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if _num_targets(labels) == 0:
        return None
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def tokenize_prompt(tok: Any, messages: list[Message]) -> list[int]:
    """The prompt rendered with the generation prompt (the assistant header), ready for sampling."""
    return _encode(tok, render(tok, messages, add_generation_prompt=True))[0]


def _completion_ids(tok: Any, prompt: list[Message], completion: list[Message]) -> list[int]:
    """Tokens of the completion as the template renders it after the prompt, through the end-of-turn (EOS) token
    and not beyond (ChatML's trailing newline is not part of the reply)."""
    before = render(tok, prompt, add_generation_prompt=True)
    full = render(tok, prompt + completion)
    if full.startswith(before):
        text = full[len(before):]
    else:
        text = "".join(m["content"] for m in completion)
    eos = tok.eos_token or ""
    k = _eos_after_reply(text, "".join(m["content"] for m in completion), eos)
    if k >= 0:
        text = text[: k + len(eos)]
    ids = _encode(tok, text)[0]
    if tok.eos_token_id is not None and (not ids or ids[-1] != tok.eos_token_id):
        ids.append(tok.eos_token_id)
    return ids


def _truncate_prompt_completions(prompt: list[int], completions: list[list[int]], max_length: int):
    """Keep the prompt's tail (the question nearest the reply) and each completion's head within max_length.
    The prompt keeps at least half of max_length when a completion is long. None if no completion token fits."""
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return prompt, completions, False
    keep = min(len(prompt), max(max_length - longest, max_length // 2))
    budget = max_length - keep
    if budget < 1:
        return None
    return prompt[len(prompt) - keep:], [c[:budget] for c in completions], True


def tokenize_preference(tok: Any, ex: PreferenceExample, max_length: int) -> dict | None:
    """`{"prompt_ids", "chosen_ids", "rejected_ids", "margin", "truncated"}`; completions end with the EOS token
    (unless truncated). None when not even one completion token fits in max_length."""
    prompt = tokenize_prompt(tok, ex.prompt)
    chosen, rejected = _completion_ids(tok, ex.prompt, ex.chosen), _completion_ids(tok, ex.prompt, ex.rejected)
    cut = _truncate_prompt_completions(prompt, [chosen, rejected], max_length)
    if cut is None:
        return None
    prompt, (chosen, rejected), truncated = cut
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "margin": ex.margin,
            "truncated": truncated}


def tokenize_unpaired(tok: Any, ex: UnpairedExample, max_length: int) -> dict | None:
    """`{"prompt_ids", "completion_ids", "desirable", "truncated"}`, truncated like a preference pair."""
    prompt = tokenize_prompt(tok, ex.prompt)
    cut = _truncate_prompt_completions(prompt, [_completion_ids(tok, ex.prompt, ex.completion)], max_length)
    if cut is None:
        return None
    prompt, (completion,), truncated = cut
    return {"prompt_ids": prompt, "completion_ids": completion, "desirable": ex.desirable, "truncated": truncated}


def tokenize_ranking(tok: Any, ex: RankingExample, max_length: int) -> dict | None:
    """`{"prompt_ids", "response_ids" (best first), "truncated"}`, truncated like a preference pair."""
    prompt = tokenize_prompt(tok, ex.prompt)
    responses = [_completion_ids(tok, ex.prompt, r) for r in ex.responses]
    cut = _truncate_prompt_completions(prompt, responses, max_length)
    if cut is None:
        return None
    prompt, responses, truncated = cut
    return {"prompt_ids": prompt, "response_ids": responses, "truncated": truncated}


def tokenize_classification(tok: Any, ex: ClassificationExample, max_length: int,
                            label2id: dict[str | int, int]) -> dict:
    """`{"input_ids", "label", "truncated"}`: the text (with the tokenizer's special tokens), head kept."""
    label = label2id.get(ex.label, label2id.get(str(ex.label)))
    if label is None:
        raise DataError(f"label {ex.label!r} is not in the label set {sorted(map(str, label2id))}", field="label")
    ids = list(tok(ex.text, add_special_tokens=True)["input_ids"])
    return {"input_ids": ids[:max_length], "label": int(label), "truncated": len(ids) > max_length}


def tokenize_examples(tok: Any, examples: list[Example], *, max_length: int, stats: DataStats | None = None,
                      loss_on: str = "assistant", label2id: dict | None = None) -> list[dict]:
    """Tokenise a list of examples of one kind, counting truncated and dropped rows in `stats`."""
    out = []
    for ex in examples:
        if isinstance(ex, (ChatExample, TextExample)):
            item = tokenize_sft(tok, ex, loss_on, max_length)
        elif isinstance(ex, PreferenceExample):
            item = tokenize_preference(tok, ex, max_length)
        elif isinstance(ex, RankingExample):
            item = tokenize_ranking(tok, ex, max_length)
        elif isinstance(ex, UnpairedExample):
            item = tokenize_unpaired(tok, ex, max_length)
        elif isinstance(ex, ClassificationExample):
            if label2id is None:
                raise DataError("classification examples need a label2id map")
            item = tokenize_classification(tok, ex, max_length, label2id)
        else:
            item = {"input_ids": tokenize_prompt(tok, ex.prompt), "meta": ex.meta, "truncated": False}
        if item is None:
            if stats is not None:
                stats.dropped += 1
            continue
        if stats is not None and item["truncated"]:
            stats.truncated += 1
        out.append(item)
    return out
