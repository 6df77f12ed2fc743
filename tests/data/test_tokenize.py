"""Chat templates, label masking, truncation. The tokenizer is word-level, so token i is the i-th word or marker."""

from __future__ import annotations

import pytest

from posttrain.data import (
    CHATML_TEMPLATE,
    ChatExample,
    ClassificationExample,
    DataStats,
    PreferenceExample,
    TextExample,
    render,
    resolve_chat_template,
    tokenize_classification,
    tokenize_examples,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

IGNORE = -100
CONVERSATION = ChatExample([
    {"role": "system", "content": "Be brief"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello friend"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "see you"},
])
# ChatML renders these 23 tokens:
#  0 <|im_start|> 1 system 2 Be 3 brief 4 <|im_end|>
#  5 <|im_start|> 6 user 7 hi 8 <|im_end|>
#  9 <|im_start|> 10 assistant 11 hello 12 friend 13 <|im_end|>
# 14 <|im_start|> 15 user 16 bye 17 <|im_end|>
# 18 <|im_start|> 19 assistant 20 see 21 you 22 <|im_end|>
TOKENS = ("<|im_start|> system Be brief <|im_end|> <|im_start|> user hi <|im_end|> <|im_start|> assistant hello "
          "friend <|im_end|> <|im_start|> user bye <|im_end|> <|im_start|> assistant see you <|im_end|>").split()
LABELLED = {
    "assistant": [11, 12, 13, 20, 21, 22],  # both replies and their <|im_end|>; not the headers
    "completion": [20, 21, 22],  # the last reply only
    "all": list(range(23)),
}


@pytest.mark.parametrize("loss_on", sorted(LABELLED))
def test_label_masking_hand_built_conversation(tok, loss_on):
    item = tokenize_sft(tok, CONVERSATION, loss_on, max_length=64)
    assert tok.convert_ids_to_tokens(item["input_ids"]) == TOKENS
    labelled = [i for i, x in enumerate(item["labels"]) if x != IGNORE]
    assert labelled == LABELLED[loss_on]
    assert all(item["labels"][i] == item["input_ids"][i] for i in labelled)
    assert item["truncated"] is False


def test_text_example_gets_eos_and_all_labels(tok):
    item = tokenize_sft(tok, TextExample("it was a good movie"), "assistant", 64)
    assert tok.convert_ids_to_tokens(item["input_ids"]) == ["it", "was", "a", "good", "movie", "<|im_end|>"]
    assert item["labels"] == item["input_ids"]


def test_eos_appended_when_the_template_has_none(tok):
    """A Jinja template whose replies end with no EOS: the EOS is appended, labelled, after the last reply."""
    plain = ("{% for m in messages %}{{ m['role'] + ' ' + m['content'] + ' ' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ 'assistant ' }}{% endif %}")
    assert resolve_chat_template(tok, plain) == plain
    assert resolve_chat_template(tok, "chatml") == CHATML_TEMPLATE
    assert resolve_chat_template(tok, "auto") == tok.chat_template
    saved = tok.chat_template
    tok.chat_template = plain
    try:
        item = tokenize_sft(tok, ChatExample(CONVERSATION.messages[1:3]), "assistant", 64)
    finally:
        tok.chat_template = saved
    assert tok.convert_ids_to_tokens(item["input_ids"]) == ["user", "hi", "assistant", "hello", "friend", "<|im_end|>"]
    assert [i for i, x in enumerate(item["labels"]) if x != IGNORE] == [3, 4, 5]


def test_truncation_cuts_the_completion_and_drops_prompt_only_rows(tok):
    """max_length 22 cuts the final <|im_end|>: labels 20, 21 remain. max_length 13 keeps tokens 0..12: the first
    reply's words (11, 12) are still labelled under `assistant`, but nothing under `completion` (its reply starts at
    20), so that row is dropped."""
    cut = tokenize_sft(tok, CONVERSATION, "completion", 22)
    assert len(cut["input_ids"]) == 22 and cut["truncated"] is True
    assert [i for i, x in enumerate(cut["labels"]) if x != IGNORE] == [20, 21]
    assert [i for i, x in enumerate(tokenize_sft(tok, CONVERSATION, "assistant", 13)["labels"]) if x != IGNORE] == [11, 12]
    assert tokenize_sft(tok, CONVERSATION, "completion", 13) is None

    stats = DataStats()
    items = tokenize_examples(tok, [CONVERSATION, ChatExample(CONVERSATION.messages[:3]), CONVERSATION],
                              max_length=13, loss_on="completion", stats=stats)
    # Example 2 ends with the first reply (14 tokens): truncated to 13 with 11, 12 labelled; examples 1 and 3 dropped.
    assert (len(items), stats.truncated, stats.dropped) == (1, 1, 2)


def test_prompt_ends_with_the_assistant_header(tok):
    ids = tokenize_prompt(tok, CONVERSATION.messages[:2])
    assert tok.convert_ids_to_tokens(ids) == TOKENS[:11]


def test_preference_ids_concatenate_to_the_rendered_conversation(tok):
    prompt = CONVERSATION.messages[:2]
    chosen = [{"role": "assistant", "content": "hello friend"}]
    rejected = [{"role": "assistant", "content": "bye"}]
    item = tokenize_preference(tok, PreferenceExample(prompt, chosen, rejected, 1.5), 64)
    assert tok.convert_ids_to_tokens(item["chosen_ids"]) == ["hello", "friend", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(item["rejected_ids"]) == ["bye", "<|im_end|>"]
    full = tok(render(tok, prompt + chosen), add_special_tokens=False)["input_ids"]
    assert item["prompt_ids"] + item["chosen_ids"] == full
    assert item["margin"] == 1.5 and item["truncated"] is False


def test_preference_truncation_keeps_prompt_tail_and_completion_head(tok):
    """Prompt 11 tokens, chosen 3, rejected 2; 11 + 3 > 8. The prompt keeps its last min(11, max(8 - 3, 8 // 2)) = 5
    tokens and the completions fit in 8 - 5 = 3, so they stay whole."""
    ex = PreferenceExample(CONVERSATION.messages[:2], [{"role": "assistant", "content": "hello friend"}],
                           [{"role": "assistant", "content": "bye"}])
    item = tokenize_preference(tok, ex, 8)
    assert tok.convert_ids_to_tokens(item["prompt_ids"]) == TOKENS[6:11]
    assert len(item["chosen_ids"]) == 3 and len(item["rejected_ids"]) == 2 and item["truncated"]
    # max_length 4: keep = min(11, max(1, 2)) = 2, completions cut to their first 2 tokens.
    short = tokenize_preference(tok, ex, 4)
    assert tok.convert_ids_to_tokens(short["prompt_ids"]) == TOKENS[9:11]
    assert tok.convert_ids_to_tokens(short["chosen_ids"]) == ["hello", "friend"]


def test_classification(tok):
    item = tokenize_classification(tok, ClassificationExample("it was a good movie", "good"), 3,
                                   {"bad": 0, "good": 1})
    assert item == {"input_ids": tok.convert_tokens_to_ids(["it", "was", "a"]), "label": 1, "truncated": True}
