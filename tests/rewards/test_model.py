"""ModelReward on a tiny LlamaForSequenceClassification (num_labels=1) and a tiny BPE tokenizer on disk."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from posttrain.config import RewardConfig
from posttrain.errors import RewardError
from posttrain.models import load_tokenizer
from posttrain.rewards import ModelReward, build_reward, render_pair

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = ["What is 12 plus 30? The answer is 42.", "a great film, I loved it", "a dull film, I hated it"] * 4

PROMPTS = [
    "What is 12 plus 30?",
    [{"role": "system", "content": "be kind"}, {"role": "user", "content": "a great film"}],
    "hi",
]
COMPLETIONS = ["The answer is 42.", "I loved it, a great great film, I loved it a lot", "a"]


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A reward-model folder as `posttrain rm` leaves it: config, weights, tokenizer with ChatML."""
    out = tmp_path_factory.mktemp("rm")
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|pad|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=1, pad_token_id=tok.pad_token_id,
    )
    LlamaForSequenceClassification(config).save_pretrained(out)
    return out


def manual_score(model, ids: list[int]) -> float:
    """The head applied to the final hidden state of the unpadded sequence's last token."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state  # (1, T, H)
        return model.score(hidden[0, -1]).item()


def test_render_ends_with_end_of_turn(rm_dir):
    """ChatML puts "\\n" after <|im_end|>; the rendered pair stops at <|im_end|>, and a string prompt is one user turn."""
    tok = load_tokenizer(rm_dir)
    ids = render_pair(tok, "hi", "a")
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 2
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\na<|im_end|>"
    assert render_pair(tok, [{"role": "user", "content": "hi"}], "a") == ids
    long = render_pair(tok, "hi", "a great film " * 20, max_length=16)
    assert len(long) == 16 and long[-1] == tok.eos_token_id


def test_scores_match_manual_forward(rm_dir):
    reward = ModelReward(rm_dir, device="cpu", dtype="float32", batch_size=2)
    scores = reward(PROMPTS, COMPLETIONS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    expected = [manual_score(reward.model, render_pair(reward.tokenizer, p, c)) for p, c in zip(PROMPTS, COMPLETIONS)]
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=0, atol=1e-5)


def test_independent_of_batch_composition_and_size(rm_dir):
    """"hi"/"a" scored alone equals the same item right-padded beside two longer items, for every batch_size.

    The model runs in float64 and scores come back as float32, so they agree to 1e-7."""
    tok = load_tokenizer(rm_dir)
    model = LlamaForSequenceClassification.from_pretrained(rm_dir, dtype=torch.float64).eval()
    alone = ModelReward(model, tok, batch_size=1)([PROMPTS[2]], [COMPLETIONS[2]])
    for batch_size in (1, 2, 8):
        together = ModelReward(model, tok, batch_size=batch_size)(PROMPTS, COMPLETIONS)
        torch.testing.assert_close(together[2], alone[0], rtol=0, atol=1e-7)
    reordered = ModelReward(model, tok, batch_size=2)(PROMPTS[::-1], COMPLETIONS[::-1])
    torch.testing.assert_close(reordered, together.flip(0), rtol=0, atol=1e-7)


def test_score_ids_fast_path(rm_dir):
    """Right-padded ids from the shared tokenizer give the same scores as the text path."""
    reward = ModelReward(rm_dir, device="cpu", dtype="float32")
    seqs = [render_pair(reward.tokenizer, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    width = max(map(len, seqs)) + 3  # extra all-pad columns must not matter
    ids = torch.full((3, width), reward.tokenizer.pad_token_id)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    torch.testing.assert_close(reward.score_ids(ids, mask), reward(PROMPTS, COMPLETIONS), rtol=0, atol=1e-5)


def test_normalisation_from_config(rm_dir, tmp_path):
    """posttrain_reward_bias = 0.5, posttrain_reward_scale = 2 in config.json: reward = (raw - 0.5) / 2."""
    raw = ModelReward(rm_dir, device="cpu", dtype="float32")(PROMPTS, COMPLETIONS)
    model = LlamaForSequenceClassification.from_pretrained(rm_dir)
    model.config.posttrain_reward_bias = 0.5
    model.config.posttrain_reward_scale = 2.0
    model.save_pretrained(tmp_path)
    load_tokenizer(rm_dir).save_pretrained(tmp_path)
    normed = build_reward(RewardConfig(model=str(tmp_path), batch_size=2), device="cpu", dtype="float32")
    torch.testing.assert_close(normed(PROMPTS, COMPLETIONS), (raw - 0.5) / 2.0, rtol=0, atol=1e-5)


def test_classifier_label_as_reward(rm_dir, tmp_path):
    """A 2-label sentiment classifier as the reward: the `positive` logit (index 1) at the last real token."""
    config = LlamaForSequenceClassification.from_pretrained(rm_dir).config
    config.num_labels, config.id2label = 2, {0: "negative", 1: "positive"}
    config.label2id = {"negative": 0, "positive": 1}
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    load_tokenizer(rm_dir).save_pretrained(tmp_path)
    reward = ModelReward(tmp_path, device="cpu", dtype="float32", label="positive")
    ids = render_pair(reward.tokenizer, PROMPTS[1], COMPLETIONS[1])
    with torch.no_grad():
        hidden = reward.model.model(input_ids=torch.tensor([ids])).last_hidden_state  # (1, T, H)
        expected = reward.model.score(hidden[0, -1])[1].item()
    assert reward([PROMPTS[1]], [COMPLETIONS[1]]).item() == pytest.approx(expected, abs=1e-5)
    with pytest.raises(RewardError, match="2-label classifier; name the label .*negative, positive"):
        ModelReward(tmp_path, device="cpu", dtype="float32")


def test_folder_without_trained_head(rm_dir, tmp_path):
    """A causal-LM folder would get a random head, so it is refused; so is a folder with no model."""
    config = LlamaForSequenceClassification.from_pretrained(rm_dir).config
    LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    with pytest.raises(RewardError, match="has no trained scalar head .*LlamaForCausalLM"):
        ModelReward(tmp_path / "lm", device="cpu")
    with pytest.raises(RewardError, match="is not a model folder"):
        ModelReward(tmp_path / "nothing", device="cpu")
