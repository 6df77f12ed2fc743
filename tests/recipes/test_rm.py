"""`posttrain rm` end to end on the tiny model: learning, rankings, padding invariance, normalisation, loading.

The learnable set: 200 training and 40 held-out pairs whose chosen response contains the word
"thanks" somewhere and whose rejected response does not (random filler words otherwise).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from posttrain.cli import main as cli
from posttrain.data import (
    PreferenceExample,
    RankingExample,
    collate_pairs,
    collate_rankings,
    load_examples,
    tokenize_preference,
    tokenize_ranking,
)
from posttrain.losses.reward import ranking_loss
from posttrain.models import load_sequence_classifier, load_tokenizer, sequence_scores, token_values
from posttrain.models.tiny import build_tiny_model
from posttrain.recipes.rm import make_evaluate, make_loss, num_examples, pair_rewards
from posttrain.config import RMConfig
from posttrain.rewards import ModelReward

WORDS = ["apple", "river", "stone", "cloud", "green", "music", "paper", "light", "table", "horse", "quiet", "bread"]
ACCURACY_THRESHOLD = 0.9  # held-out pair accuracy after 12 steps of 8 pairs; chance is 0.5, the untrained model 0.3


def marker_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        chosen = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        chosen.insert(rng.randint(0, len(chosen)), "thanks")
        rejected = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
        rows.append({"prompt": f"Say something about {rng.choice(WORDS)}.", "chosen": " ".join(chosen),
                     "rejected": " ".join(rejected)})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ex(prompt: str, *responses: str):
    user = [{"role": "user", "content": prompt}]
    turns = [[{"role": "assistant", "content": r}] for r in responses]
    return PreferenceExample(user, *turns) if len(turns) == 2 else RankingExample(user, turns)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


@pytest.fixture(scope="session")
def tok(tiny):
    return load_tokenizer(tiny)


@pytest.fixture(scope="session")
def prefs(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    return write_jsonl(d / "train.jsonl", marker_rows(200, seed=1)), write_jsonl(d / "eval.jsonl", marker_rows(40, seed=2))


def rm_args(tiny, train, out, *extra) -> list[str]:
    return ["rm", f"model={tiny}", f"data.train={train}", f"output_dir={out}", "batch_size=8",
            "learning_rate=1e-3", "logging.progress=false", "logging.steps=1", *extra]


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def trained(tiny, prefs, tmp_path_factory):
    """12 full fine-tuning steps of 8 pairs with normalize=true (the default), evaluated on the held-out pairs."""
    out = tmp_path_factory.mktemp("rm") / "run"
    assert cli(rm_args(tiny, prefs[0], out, f"data.eval={prefs[1]}", "max_steps=12", "logging.eval_steps=12")) == 0
    return out


def untrained_eval_accuracy(tiny, tok, eval_file) -> float:
    torch.manual_seed(0)  # the new head's init; the recipe seeds the same way in setup_run
    model = load_sequence_classifier(tiny, num_labels=1, tokenizer=tok, device="cpu").eval()
    examples, _ = load_examples(eval_file, "preference")
    items = [tokenize_preference(tok, e, 512) for e in examples]
    with torch.no_grad():
        return make_evaluate(items, RMConfig(), lambda g: collate_pairs(g, tok.pad_token_id))(model)["eval_accuracy"]


def test_learns_held_out_preferences(trained, tiny, tok, prefs):
    """Held-out accuracy >= 0.9 after 12 steps; the untrained model (random head) is below that."""
    metrics = read_metrics(trained)
    final_eval = [m for m in metrics if "eval_accuracy" in m][-1]
    train = [m for m in metrics if "accuracy" in m]
    assert final_eval["eval_accuracy"] >= ACCURACY_THRESHOLD
    assert final_eval["eval_margin"] > 0 and final_eval["eval_loss"] < math.log(2)
    assert untrained_eval_accuracy(tiny, tok, prefs[1]) < ACCURACY_THRESHOLD
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "rewards/mean", "rewards/std"):
        assert key in train[-1], key
    assert train[-1]["loss"] < train[0]["loss"]
    assert "normalize/bias" in metrics[-1] and metrics[-1]["normalize/scale"] > 0


def test_model_reward_equals_training_forward(trained, tok, prefs):
    """ModelReward(final) renders the text itself; raw score must equal the training forward's (same EOS token)."""
    reward = ModelReward(str(trained / "final"), device="cpu")
    model = reward.model
    examples, _ = load_examples(prefs[0], "preference")
    items = [tokenize_preference(tok, e, 512) for e in examples[:6]]
    with torch.no_grad():
        r_chosen, r_rejected, _, _ = pair_rewards(model, collate_pairs(items, tok.pad_token_id))
    prompts = [e.prompt for e in examples[:6]]
    got_c = reward(prompts, [e.chosen[0]["content"] for e in examples[:6]])
    got_r = reward(prompts, [e.rejected[0]["content"] for e in examples[:6]])
    torch.testing.assert_close(got_c * reward.scale + reward.bias, r_chosen, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_r * reward.scale + reward.bias, r_rejected, atol=1e-4, rtol=1e-4)
    assert items[0]["chosen_ids"][-1] == tok.eos_token_id  # the scored position is the end-of-turn token


def test_normalisation_gives_mean_0_std_1_on_training_chosen(trained, prefs):
    rows = [json.loads(line) for line in open(prefs[0])]
    rewards = ModelReward(str(trained / "final"), device="cpu")([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    assert abs(float(rewards.mean())) < 1e-3
    assert abs(float(rewards.std(unbiased=False)) - 1.0) < 1e-3


def test_final_loads_with_transformers_and_as_critic(trained, tok):
    """AutoModelForSequenceClassification's own pooling (via config.pad_token_id) gives our score; a critic
    loaded from final/ has a value at every position whose last equals that score."""
    final = trained / "final"
    hf = AutoModelForSequenceClassification.from_pretrained(str(final)).eval()
    item = tokenize_preference(tok, ex("Say something about bread.", "bread thanks", "bread stone"), 512)
    batch = collate_pairs([item], tok.pad_token_id)
    with torch.no_grad():
        hf_scores = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]  # (2,)
        ours = sequence_scores(hf, batch.input_ids, batch.attention_mask)
        critic = load_sequence_classifier(str(final), num_labels=1, device="cpu").eval()
        values = token_values(critic, batch.input_ids, batch.attention_mask)  # (2, T)
    torch.testing.assert_close(hf_scores, ours, atol=1e-5, rtol=1e-5)
    last = batch.attention_mask.sum(-1) - 1
    torch.testing.assert_close(values[torch.arange(2), last], ours, atol=1e-5, rtol=1e-5)


def test_padding_side_and_batch_composition_do_not_change_a_pair_reward(tiny, tok):
    torch.manual_seed(0)
    model = load_sequence_classifier(tiny, num_labels=1, tokenizer=tok, device="cpu").eval()
    items = [tokenize_preference(tok, e, 512) for e in (
        ex("Say something about bread.", "bread thanks", "stone"),
        ex("Say a lot about the river and the stone.", "river stone paper light thanks music", "cloud"),
        ex("Hi.", "green", "horse table quiet quiet"),
    )]
    with torch.no_grad():
        alone = pair_rewards(model, collate_pairs(items[:1], tok.pad_token_id))
        for side in ("right", "left"):
            full = pair_rewards(model, collate_pairs(items, tok.pad_token_id, padding_side=side))
            torch.testing.assert_close(full[0][:1], alone[0], atol=1e-5, rtol=1e-5)  # chosen reward of pair 0
            torch.testing.assert_close(full[1][:1], alone[1], atol=1e-5, rtol=1e-5)  # rejected reward of pair 0
            swapped = pair_rewards(model, collate_pairs(items[::-1], tok.pad_token_id, padding_side=side))
            torch.testing.assert_close(swapped[0].flip(0), full[0], atol=1e-5, rtol=1e-5)


def test_ranking_reduction_is_instructgpt_per_prompt_mean(tiny, tok):
    """Batch: a K=3 ranking (3 pairs, each weight 1/3), a K=4 ranking (6 pairs, weight 1/6), a plain pair (weight 1).
    loss_sum / count = (ranking_loss(r_3) + ranking_loss(r_4) + ranking_loss(r_2)) / 3, each ranking_loss
    computed from rewards of unbatched, unpadded single forwards."""
    torch.manual_seed(0)
    model = load_sequence_classifier(tiny, num_labels=1, tokenizer=tok, device="cpu").eval()
    examples = [ex("Rank these.", "thanks a lot", "ok", "no"),
                ex("Rank four.", "thanks apple", "apple", "stone river", "quiet"),
                ex("Pair.", "thanks", "bread")]
    items = [tokenize_ranking(tok, e, 512) if isinstance(e, RankingExample) else tokenize_preference(tok, e, 512)
             for e in examples]
    batch = collate_rankings(items, tok.pad_token_id)
    with torch.no_grad():
        loss_sum, stats = make_loss(RMConfig())(model, batch)
        _, _, weight, _ = pair_rewards(model, batch)
        expected = []
        for it in items:
            responses = it.get("response_ids") or [it["chosen_ids"], it["rejected_ids"]]
            r = torch.stack([sequence_scores(model, torch.tensor([it["prompt_ids"] + resp]),
                                             torch.ones(1, len(it["prompt_ids"]) + len(resp), dtype=torch.long))[0]
                             for resp in responses])  # (K,)
            expected.append(ranking_loss(r))
    assert num_examples(batch) == 3 and stats["accuracy"][1] == 3 + 6 + 1
    torch.testing.assert_close(weight, torch.tensor([1 / 3] * 3 + [1 / 6] * 6 + [1.0]))
    torch.testing.assert_close(loss_sum / num_examples(batch), torch.stack(expected).mean(), atol=1e-5, rtol=1e-5)


def test_margin_column_and_centring_enter_the_loss(tiny, tok):
    """loss_sum = sum_b -log sigmoid(r_c - r_r - m_b) + coef * (r_c + r_r)^2, with m = (1.5, 0) from the rows
    (a row without a margin gets 0); margin=false ignores the column."""
    torch.manual_seed(0)
    model = load_sequence_classifier(tiny, num_labels=1, tokenizer=tok, device="cpu").eval()
    a, b = ex("Hi.", "thanks", "stone"), ex("Go.", "bread", "thanks bread")
    a.margin = 1.5
    batch = collate_pairs([tokenize_preference(tok, e, 512) for e in (a, b)], tok.pad_token_id)
    with torch.no_grad():
        r_c, r_r, _, _ = pair_rewards(model, batch)
        with_margin, _ = make_loss(RMConfig(margin=True, center_rewards_coef=0.1))(model, batch)
        without, _ = make_loss(RMConfig(margin=False))(model, batch)
    m = torch.tensor([1.5, 0.0])
    expected = (-torch.nn.functional.logsigmoid(r_c - r_r - m) + 0.1 * (r_c + r_r) ** 2).sum()
    torch.testing.assert_close(with_margin, expected)
    torch.testing.assert_close(without, -torch.nn.functional.logsigmoid(r_c - r_r).sum())
    ranked = collate_rankings([tokenize_ranking(tok, ex("R.", "x", "y", "z"), 512), tokenize_preference(tok, a, 512)],
                              tok.pad_token_id)
    assert ranked.margin.tolist() == [0.0, 0.0, 0.0, 1.5]  # a K=3 ranking's pairs have none; the pair keeps its own


def test_ranking_file_trains(tiny, tmp_path):
    """A file of K-way rankings (and pairs) trains through the CLI and saves a usable reward model."""
    rng = random.Random(3)
    rows = []
    for i in range(24):
        k = 3 + i % 2
        responses = [" ".join([rng.choice(WORDS)] * (k - j)) + " thanks" * (k - j) for j in range(k)]
        rows.append({"prompt": f"Rank {i}.", "ranking": responses})
    rows.append({"prompt": "A pair.", "chosen": "thanks thanks", "rejected": "stone", "margin": 0.5})
    train = write_jsonl(tmp_path / "rank.jsonl", rows)
    out = tmp_path / "run"
    assert cli(rm_args(tiny, train, out, "max_steps=4", "batch_size=5", "data.eval_split=0.2", "normalize=false")) == 0
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
    assert "eval_accuracy" in metrics[-1]
    reward = ModelReward(str(out / "final"), device="cpu")
    assert reward.bias == 0.0 and reward.scale == 1.0
    assert reward(["Rank 0."], ["stone"]).shape == (1,)


def test_lora_trains_head_and_merged_model_is_a_reward(tiny, prefs, tmp_path):
    out = tmp_path / "run"
    assert cli(rm_args(tiny, prefs[0], out, "max_steps=2", "data.max_rows=32", "lora.r=4", "save.merge_lora=true")) == 0
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and (final / "merged" / "config.json").is_file()
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert "score" in adapter["modules_to_save"]
    reward = ModelReward(str(final), device="cpu")  # uses final/merged, normalisation stored in its config
    rows = [json.loads(line) for line in open(prefs[0])][:32]  # the rows the run trained (and normalised) on
    r = reward([x["prompt"] for x in rows], [x["chosen"] for x in rows])
    assert abs(float(r.mean())) < 1e-3 and abs(float(r.std(unbiased=False)) - 1) < 1e-3


def test_freeze_trains_only_head_and_norm(tiny, prefs, tmp_path):
    out = tmp_path / "run"
    assert cli(rm_args(tiny, prefs[0], out, "max_steps=2", "data.max_rows=16", "freeze.trainable_layers=0", "normalize=false")) == 0
    before = AutoModelForSequenceClassification.from_pretrained(tiny).state_dict()
    after = AutoModelForSequenceClassification.from_pretrained(str(out / "final")).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.norm.weight", "score.weight"}  # blocks and embeddings stay frozen


def test_bad_preference_row_names_file_row_and_field(tiny, tmp_path, capsys):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]
    train = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert cli(rm_args(tiny, train, tmp_path / "run", "max_steps=1")) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 2" in err and "rejected" in err


@pytest.mark.slow
def test_arithmetic_preferences_from_the_tiny_model(tiny, tmp_path):
    """The built-in arithmetic prefs (chosen: right answer, rejected: a wrong one), 10% held out."""
    assert cli(["task", "arithmetic", str(tmp_path / "arith")]) == 0
    out = tmp_path / "run"
    assert cli(rm_args(tiny, tmp_path / "arith" / "prefs.jsonl", out, "max_steps=200", "batch_size=32",
                       "learning_rate=2e-3", "warmup_ratio=0.05", "data.eval_split=0.1", "logging.eval_steps=200")) == 0
    assert [m for m in read_metrics(out) if "eval_accuracy" in m][-1]["eval_accuracy"] >= 0.55  # measured 0.585


def test_rm_on_the_sentiment_task_prefs_is_far_above_chance(tiny_model, senti_dir, tmp_path):
    """Issue 3: `posttrain rm` on a built-in task's prefs.jsonl from the tiny model. Threshold 0.9 held-out pair
    accuracy; the untrained head is at chance (~0.5) at step 0."""
    from posttrain.engine import read_metrics

    out = tmp_path / "rm-senti"
    assert cli(["rm", f"model={tiny_model}", f"data.train={senti_dir / 'prefs.jsonl'}", "data.eval_split=0.1",
                 f"output_dir={out}", "max_steps=30", "batch_size=32", "learning_rate=2e-3", "warmup_ratio=0.05",
                 "logging.eval_steps=30", "logging.progress=false"]) == 0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_accuracy"] < 0.8
    assert evals[-1]["eval_accuracy"] >= 0.9


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, arith_dir, tmp_path):
    """2 gloo ranks x 4 pairs == 1 process x 8 pairs a step (DDP): the same losses, accuracies, held-out metrics
    (each rank evaluates half) and final weights, and the same reward normalisation written into the saved config
    (each rank scores half the training chosen responses)."""
    from posttrain.engine import read_metrics
    from tests.recipes.multiproc import assert_same_trained_weights, run_two_processes

    def args(out, *extra):
        return ["rm", f"model={tiny_model}", f"data.train={arith_dir / 'prefs.jsonl'}", f"output_dir={out}",
                "data.eval_split=0.25", "max_steps=3", "max_length=64", "learning_rate=1e-3", "dtype=float32",
                "logging.progress=false", "logging.steps=1", "data.max_rows=64", *extra]

    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(args(one, "batch_size=8")) == 0
    run_two_processes(args(two, "batch_size=4"))
    rows1, rows2 = ([r for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (one, two))
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [1, 2, 3]
    for a, b in zip(rows1, rows2):
        for key in ("loss", "accuracy", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    evals1, evals2 = ([r for r in read_metrics(d / "metrics.jsonl") if "eval_loss" in r] for d in (one, two))
    assert [r["step"] for r in evals1] == [r["step"] for r in evals2] and len(evals1) >= 2
    for a, b in zip(evals1, evals2):  # each rank scores half the held-out pairs; sums and lists are gathered
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    c1, c2 = (json.loads((d / "final" / "config.json").read_text()) for d in (one, two))
    for key in ("posttrain_reward_bias", "posttrain_reward_scale"):
        assert c1[key] == pytest.approx(c2[key], rel=1e-3, abs=1e-4), key
    assert_same_trained_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")
