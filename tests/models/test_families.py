"""Family conformance: every family's log-probs are log_softmax of its own logits, its template masks exactly the
assistant turns, its tokenizer pads with a token that is not EOS, and every command runs on it.

The families are tiny random models with their real chat templates (`tests/families.py`). Llama 3, Gemma 3
(softcap, sliding window, BOS) and Granite (logit scaling) run in the normal suite; the whole matrix is `slow`.
"""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, NAMES, WINDOW, build_family
from torch.nn import functional as F
from transformers import AutoModelForSequenceClassification, PhiConfig, PhiForCausalLM

from posttrain.cli import main
from posttrain.data.collate import collate_pairs, collate_shared_pairs
from posttrain.data.formats import ChatExample, PreferenceExample
from posttrain.data.tokenize import IGNORE, tokenize_preference, tokenize_sft
from posttrain.data import positions_from_mask
from posttrain.models import load_causal_lm, load_tokenizer, takes_custom_mask, token_logprobs
from posttrain.models.head import LogitHead, _agrees, logit_head
from posttrain.recipes.dpo import completion_logps

FAST = ("llama3", "gemma3", "granite")
EVERY = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in NAMES]
CONVERSATION = [
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "The answer is 19."},
    {"role": "user", "content": "And 3 * 4?"},
    {"role": "assistant", "content": "12"},
]


def load(family_dir, name, dtype=torch.float32):
    path = family_dir(name)
    tok = load_tokenizer(path)
    model = load_causal_lm(path, dtype=dtype, device="cpu", attn_implementation=FAMILIES[name].attn, tokenizer=tok)
    return model.eval(), tok


def left_padded(tok, texts):
    """(B, T) ids and mask of `texts`, left padded with the tokenizer's pad; rows longer than the sliding window."""
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def own_logprobs(model, ids, mask, temperature=1.0):
    """log_softmax(model(...).logits / T) at the next token, float64: (B, T-1)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False).logits
    logp = F.log_softmax(logits[:, :-1].double() / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1), logits


@pytest.mark.parametrize("name", EVERY)
def test_token_logprobs_are_log_softmax_of_the_models_own_logits(family_dir, name):
    """SFT / eval (T = 1, chunked), PPO old / ref / new (T = 0.7, from the prompt's end, entropy) against
    log_softmax of the model's own logits; rows of 9-25 tokens, longer than the sliding window of 4."""
    model, tok = load(family_dir, name)
    texts = ["What is 12 + 7? The answer is 19.", "Hello!", "The quick brown fox jumps over the lazy dog."]
    ids, mask = left_padded(tok, texts)
    assert ids.shape[1] > WINDOW
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    with torch.no_grad():
        want, logits = own_logprobs(model, ids, mask)
        got = token_logprobs(model, ids, mask, chunk_size=7)
        torch.testing.assert_close(got[valid].double(), want[valid], rtol=0, atol=1e-5)
        want_t, _ = own_logprobs(model, ids, mask, temperature=0.7)
        start = 3
        got_t, entropy = token_logprobs(model, ids, mask, temperature=0.7, return_entropy=True, start=start)
        torch.testing.assert_close(got_t[valid[:, start:]].double(), want_t[:, start:][valid[:, start:]], rtol=0, atol=1e-5)
        full = F.log_softmax(logits[:, start:-1].double() / 0.7, dim=-1)
        torch.testing.assert_close(entropy.double(), -(full.exp() * full).sum(-1), rtol=0, atol=1e-5)
    fam = FAMILIES[name]
    if fam.transform:  # the test can fail: the bare head (hidden @ W) is not this family's distribution
        weight = model.get_output_embeddings().weight
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        bare = F.log_softmax((hidden[:, :-1] @ weight.T).double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        assert (bare[valid] - want[valid]).abs().max() > 0.05
    assert logit_head(model).own_forward is False  # the chunked path, not the fallback


@pytest.mark.parametrize("name", EVERY)
def test_dpo_pair_logprobs_equal_each_sequence_on_its_own(family_dir, name):
    """DPO's completion log-probs, shared-prompt layout and plain pairs, equal the sum of log_softmax of the model's
    own logits over each prompt+completion row run alone."""
    model, tok = load(family_dir, name)
    examples = [PreferenceExample(prompt=[{"role": "user", "content": "What is 12 + 7?"}],
                                  chosen=[{"role": "assistant", "content": "The answer is 19."}],
                                  rejected=[{"role": "assistant", "content": "The answer is 21, I think."}]),
                PreferenceExample(prompt=[{"role": "user", "content": "Say hi"}],
                                  chosen=[{"role": "assistant", "content": "Hello!"}],
                                  rejected=[{"role": "assistant", "content": "No."}])]
    items = [tokenize_preference(tok, ex, max_length=128) for ex in examples]
    want = []
    for key in ("chosen_ids", "rejected_ids"):
        for it in items:
            seq = torch.tensor([it["prompt_ids"] + it[key]])
            with torch.no_grad():
                logp, _ = own_logprobs(model, seq, torch.ones_like(seq))
            want.append(float(logp[0, len(it["prompt_ids"]) - 1:].sum()))
    layouts = [collate_pairs(items, tok.pad_token_id)]
    if takes_custom_mask(model):  # a sliding window is not applied to a given mask: DPO uses the plain pairs then
        layouts.append(collate_shared_pairs(items, tok.pad_token_id))
    assert takes_custom_mask(model) == (not FAMILIES[name].sliding_window)
    with torch.no_grad():
        for pairs in layouts:
            got, _ = completion_logps(model, pairs)
            torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", EVERY)
def test_template_labels_exactly_the_assistant_turns_and_their_end_of_turn(family_dir, name):
    """Labelled tokens decode to each reply followed by the family's end-of-turn token, and to nothing else; where
    the fixture has a `{% generation %}` copy of the template, transformers' assistant mask is the same set."""
    fam = FAMILIES[name]
    tok = load_tokenizer(family_dir(name))
    assert tok.eos_token == fam.end_of_turn
    item = tokenize_sft(tok, ChatExample(messages=CONVERSATION), "assistant", max_length=512)
    ids, labels = item["input_ids"], item["labels"]
    runs, current = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [r + fam.end_of_turn for r in replies]
    if fam.bos is not None and fam.bos != fam.eos and fam.template and "bos_token" in fam.template:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, not two
    if fam.tagged_template:
        rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
        assert tok.apply_chat_template(CONVERSATION, tokenize=False, chat_template=fam.tagged_template) == rendered
        out = tok.apply_chat_template(CONVERSATION, chat_template=fam.tagged_template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids[: len(out["input_ids"])]
        mask = [lab != IGNORE for lab in labels[: len(out["input_ids"])]]
        assert mask == [bool(m) for m in out["assistant_masks"]]


@pytest.mark.parametrize("name", EVERY)
def test_pad_token_is_not_eos_and_the_choice_is_said(family_dir, name, capsys):
    fam = FAMILIES[name]
    tok = load_tokenizer(family_dir(name))
    assert tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id
    said = capsys.readouterr().out
    if fam.pad is None or fam.pad == tok.eos_token or fam.pad == fam.eos == fam.end_of_turn:
        assert f"padding with `{tok.pad_token}`" in said and f"EOS stays `{tok.eos_token}`" in said
    else:
        assert tok.pad_token == fam.pad and "padding with" not in said


@pytest.mark.parametrize("name", EVERY)
def test_eval_perplexity_equals_transformers_own(family_dir, name, tmp_path):
    """The bug report's check: `posttrain eval MODEL data=text.jsonl` against exp(mean NLL) from the model's own
    logits over the same tokens (transformers' shifted cross-entropy)."""
    texts = ["The quick brown fox jumps over the lazy dog.", "What is 12 + 7? The answer is 19."]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "eval.json"
    assert main(["eval", str(family_dir(name)), f"data={data}", f"output={out}", "dtype=float32"]) == 0
    got = json.loads(out.read_text())["perplexity"]
    model, tok = load(family_dir, name)
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=True)["input_ids"]
        ids = ids + ([tok.eos_token_id] if ids[-1] != tok.eos_token_id else [])
        seq = torch.tensor([ids])
        with torch.no_grad():
            loss = model(input_ids=seq, labels=seq).loss  # transformers' own mean NLL over the T-1 targets
        nll += float(loss) * (len(ids) - 1)
        n += len(ids) - 1
    assert got == pytest.approx(float(torch.tensor(nll / n).exp()), rel=1e-5)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in NAMES
                                  if n not in ("granite", "cohere")])
def test_reward_scores_are_the_classifiers_own_logits(family_dir, name):
    """RM / critic scores read the score head from the final hidden state: equal to the sequence classifier's own
    logits at the last real token (no LM-head transform applies to a score head)."""
    from posttrain.models import load_sequence_classifier, sequence_scores

    path = family_dir(name)
    tok = load_tokenizer(path)
    rm = load_sequence_classifier(path, num_labels=1, dtype=torch.float32, device="cpu",
                                  attn_implementation=FAMILIES[name].attn, tokenizer=tok).eval()
    ids, mask = left_padded(tok, ["Hello!", "The quick brown fox jumps over the lazy dog."])
    with torch.no_grad():
        got = sequence_scores(rm, ids, mask)
        own = rm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, 0]
    torch.testing.assert_close(got, own.float(), rtol=0, atol=1e-5)


def test_granite_and_cohere_have_no_sequence_classifier(family_dir):
    """A known limit: transformers has no Granite / Cohere sequence classifier (rm, ppo's critic, sft
    classification need one)."""
    for name in ("granite", "cohere"):
        with pytest.raises(ValueError, match="Unrecognized configuration class"):
            AutoModelForSequenceClassification.from_pretrained(family_dir(name))


def test_self_check_catches_a_head_it_does_not_know(tmp_path, capsys):
    """Phi (phi-1/phi-2) has an lm_head bias, which the chunked head does not apply: the self-check sees the model's
    logits differ, the log says so once, and the log-probs come from the model's own logits, still exact. A wrong
    transform is caught the same way: Granite's head without its 1/logits_scaling disagrees with its forward."""
    config = PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = PhiForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0.0, 1.0)  # a trained phi-2 has a non-zero bias
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        got = token_logprobs(model, ids, mask)
        token_logprobs(model, ids, mask)
        want, _ = own_logprobs(model, ids, mask)
    assert logit_head(model) == LogitHead(own_forward=True)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    torch.testing.assert_close(got[valid].double(), want[valid], rtol=0, atol=1e-5)
    assert capsys.readouterr().out.count("PhiForCausalLM's logits are not lm_head(hidden)") <= 1

    model = load_causal_lm(build_family("granite", tmp_path / "granite"), dtype=torch.float32, device="cpu").eval()
    assert _agrees(model, LogitHead(scale=0.25)) and not _agrees(model, LogitHead())


# ---------------------------------------------------------------------------------------------- commands
COMMON = ["logging.progress=false", "dtype=float32", "max_length=160", "batch_size=4"]  # Qwen and Granite write a system prompt
ROLLOUT = ["rollout.max_new_tokens=6", "reward.task=arithmetic", "learning_rate=1e-4"]


def command(name, cmd, model, data, out):
    """The command line of `cmd` on a family's model: two optimizer steps, or one tiny RL iteration / round."""
    arith, senti = data
    return {
        "sft": ["sft", f"model={model}", f"data.train={arith / 'sft.jsonl'}", "max_steps=2", *COMMON],
        "sft-classification": ["sft", f"model={model}", "task=classification", f"data.train={senti / 'classify.jsonl'}",
                               "max_steps=2", *COMMON],
        "rm": ["rm", f"model={model}", f"data.train={arith / 'prefs.jsonl'}", "max_steps=2", *COMMON],
        "dpo": ["dpo", f"model={model}", f"data.train={arith / 'prefs.jsonl'}", "max_steps=2", *COMMON],
        "online-dpo": ["online-dpo", f"model={model}", f"prompts={arith / 'prompts.jsonl'}", "rounds=1",
                       "prompts_per_round=4", "samples_per_prompt=2", *ROLLOUT, *COMMON],
        "ppo": ["ppo", f"model={model}", f"prompts={arith / 'prompts.jsonl'}", "critic_init=policy",
                "rollout.batch_size=4", "total_episodes=4", "mini_batch_size=4", "ppo_epochs=1", *ROLLOUT, *COMMON],
        "grpo": ["ppo", f"model={model}", f"prompts={arith / 'prompts.jsonl'}", "advantage_estimator=grpo",
                 "rollout.samples_per_prompt=4", "rollout.batch_size=8", "total_episodes=8", "mini_batch_size=4",
                 "ppo_epochs=1", *ROLLOUT, *COMMON],
        "generate": ["generate", str(model), "prompt=What is 12 + 7? Answer with one number, please.",
                     "rollout.max_new_tokens=6", "dtype=float32"],
    }[cmd] + ([] if cmd == "generate" else [f"output_dir={out}"])


NO_CLASSIFIER = "transformers has no sequence classifier for this family (a known limit)"
NEEDS_CLASSIFIER = ("sft-classification", "rm", "ppo")
KNOWN = {(fam, cmd): NO_CLASSIFIER for fam in ("granite", "cohere") for cmd in NEEDS_CLASSIFIER}
COMMANDS = ["sft", "sft-classification", "rm", "dpo", "online-dpo", "ppo", "grpo", "generate"]


def matrix():
    for fam in NAMES:
        for cmd in COMMANDS:
            marks = [pytest.mark.slow]
            if (fam, cmd) in KNOWN:
                # strict for the lasting limit; the others pass once the fixes they name are merged
                marks.append(pytest.mark.xfail(reason=KNOWN[(fam, cmd)], strict=KNOWN[(fam, cmd)] == NO_CLASSIFIER))
            yield pytest.param(fam, cmd, marks=marks, id=f"{fam}-{cmd}")


@pytest.mark.parametrize("name,cmd", list(matrix()))
def test_every_command_runs_on_every_family(family_dir, arith_dir, senti_dir, tmp_path, name, cmd):
    out = tmp_path / "run"
    assert main(command(name, cmd, family_dir(name), (arith_dir, senti_dir), out)) == 0
    if cmd != "generate":
        assert (out / "final").is_dir()


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_generation_stop_ids_keep_the_family_list_with_the_end_of_turn_first(family_dir, name):
    """Llama 3 ships three stop ids in generation_config; loading for training makes the end-of-turn token the EOS
    but keeps the others, so `generate` on the saved model stops where the released one did."""
    fam = FAMILIES[name]
    tok = load_tokenizer(family_dir(name))
    model = load_causal_lm(family_dir(name), dtype="float32", device="cpu", tokenizer=tok)
    stops = model.generation_config.eos_token_id
    assert stops[0] == tok.convert_tokens_to_ids(fam.end_of_turn)
    assert set(stops) == {tok.convert_tokens_to_ids(t) for t in fam.generation_eos}
