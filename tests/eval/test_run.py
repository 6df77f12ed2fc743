"""`posttrain eval` on the embedded default: every field, pass@k from the per-sample verdicts, exact KL 0 to
itself, a classifier head with hand-computed accuracy / macro-F1, perplexity invariant to batching."""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.eval.metrics import pass_at_k
from posttrain.models import load_sequence_classifier, load_tokenizer, save_pretrained_atomic

FIELDS = {"num_prompts", "num_samples", "pass@1", "pass@2", "pass@3", "sampled_gold_score", "gold_accuracy",
          "gold_score", "reward", "kl", "length", "eos_rate", "perplexity", "eval_seconds", "samples",
          "sampled_gold_score_se", "measure", "warnings"}


@pytest.fixture(scope="module")
def sft_model(tiny_model, arith_dir, tmp_path_factory):
    """The tiny model after 40 SFT steps on arithmetic: it answers in the task's format, sometimes correctly."""
    out = tmp_path_factory.mktemp("eval-sft")
    assert main(["sft", f"model={tiny_model}", f"data.train={arith_dir / 'sft.jsonl'}", f"output_dir={out}",
                 "max_steps=40", "batch_size=16", "learning_rate=3e-3", "max_length=64",
                 "logging.progress=false"]) == 0
    return out / "final"


def run_eval(model, out, *extra):
    assert main(["eval", str(model), f"output={out}", "rollout.max_new_tokens=24", *extra]) == 0
    return json.loads(out.read_text())


def test_eval_json_has_every_field_and_pass_at_k_matches_the_samples(sft_model, arith_dir, tmp_path):
    result = run_eval(sft_model, tmp_path / "eval.json", "task=arithmetic", f"prompts={arith_dir / 'eval.jsonl'}",
                      "num_prompts=12", "num_samples=3", f"ref_model={sft_model}", "reward.task=arithmetic",
                      f"data={arith_dir / 'sft.jsonl'}")
    assert FIELDS <= set(result)
    assert result["num_prompts"] == 12 and result["num_samples"] == 3 and len(result["samples"]) == 12
    # pass@k recomputed from the stored verdicts: per prompt 1 - C(n-c, k) / C(n, k), then the mean
    correct = [sum(s >= 1.0 for s in rec["sample_scores"]) for rec in result["samples"]]
    for k in (1, 2, 3):
        assert result[f"pass@{k}"] == pytest.approx(sum(pass_at_k(3, c, k) for c in correct) / 12)
    assert result["pass@1"] <= result["pass@2"] <= result["pass@3"]
    # the verifier as reward.* gives the same mean as the sampled gold score
    assert result["reward"] == pytest.approx(result["sampled_gold_score"])
    greedy = [rec["greedy_score"] >= 1.0 for rec in result["samples"]]
    assert result["gold_accuracy"] == pytest.approx(sum(greedy) / 12)
    assert result["kl"] == 0.0  # the model against itself: identical forwards, exactly zero
    assert 0.0 <= result["eos_rate"] <= 1.0 and 0 < result["length"] <= 24
    assert 1.0 < result["perplexity"] < 512  # better than uniform over the 512-token vocabulary


def test_kl_to_a_different_model_is_positive(sft_model, tiny_model, arith_dir, tmp_path):
    """KL(pi || base) on pi's samples: the SFT model is far from the untrained base (many nats per response)."""
    result = run_eval(sft_model, tmp_path / "eval.json", "task=arithmetic", f"prompts={arith_dir / 'eval.jsonl'}",
                      "num_prompts=8", "num_samples=2", "greedy=false", f"ref_model={tiny_model}")
    assert result["kl"] > 10.0
    assert result["gold_accuracy"] == result["pass@1"]  # without greedy decoding, gold accuracy is sampled pass@1


def test_untrained_model_rarely_stops(tiny_model, arith_dir, tmp_path, capsys):
    result = run_eval(tiny_model, tmp_path / "eval.json", "task=arithmetic", f"prompts={arith_dir / 'eval.jsonl'}",
                      "num_prompts=6", "num_samples=2", "greedy=false", "rollout.max_new_tokens=8")
    assert 0.0 <= result["eos_rate"] <= 1.0 and result["length"] <= 8
    assert result["gold_accuracy"] == 0.0
    # a degenerate evaluation is named in eval.json and in the command's output
    assert result["eos_rate"] < 0.5 and any(w.startswith("eos-collapse: ") for w in result["warnings"])
    assert "WARNING eos-collapse: only" in capsys.readouterr().out


def test_a_graded_task_is_measured_by_its_mean_over_samples(sft_model, tmp_path):
    """sentiment's gold score is a degree (a share of positive words): no accuracy and no pass@k; the headline is
    the mean over samples with its SE over prompts (each prompt's mean over its samples is one observation)."""
    result = run_eval(sft_model, tmp_path / "eval.json", "task=sentiment", "num_prompts=6", "num_samples=3")
    assert result["measure"] == "sampled_gold_score"
    assert not any(k.startswith("pass@") for k in result) and "gold_accuracy" not in result
    means = [sum(r["sample_scores"]) / 3 for r in result["samples"]]
    mean = sum(means) / 6
    assert result["sampled_gold_score"] == pytest.approx(mean)
    se = (sum((m - mean) ** 2 for m in means) / 5 / 6) ** 0.5
    assert result["sampled_gold_score_se"] == pytest.approx(se)


def test_perplexity_does_not_depend_on_batching(sft_model, arith_dir, tmp_path):
    """Padding never changes a token-mean NLL: batch 1 and batch 64 give the same perplexity."""
    data = tmp_path / "some.jsonl"
    data.write_text("".join((arith_dir / "sft.jsonl").read_text().splitlines(keepends=True)[:20]))
    one = run_eval(sft_model, tmp_path / "a.json", f"data={data}", "batch_size=1")
    many = run_eval(sft_model, tmp_path / "b.json", f"data={data}", "batch_size=64")
    assert set(one) == {"perplexity", "eval_seconds", "samples"}
    assert one["perplexity"] == pytest.approx(many["perplexity"], rel=1e-5)


def test_classifier_with_a_zero_head_predicts_the_first_label(tiny_model, senti_dir, tmp_path):
    """Zero head: every logit is 0, argmax is label 0 for every row. With n0 rows of label 0 and n1 of label 1:
    accuracy = n0 / n; F1(label 0) = 2 n0 / (2 n0 + n1), F1(label 1) = 0, so macro-F1 = n0 / (2 n0 + n1)."""
    tok = load_tokenizer(tiny_model)
    clf = load_sequence_classifier(tiny_model, num_labels=2, id2label=["negative", "positive"], tokenizer=tok)
    with torch.no_grad():
        clf.score.weight.zero_()
    folder = save_pretrained_atomic(clf, tok, tmp_path / "clf")
    rows = [json.loads(line) for line in (senti_dir / "classify.jsonl").read_text().splitlines()[:40]]
    n0 = sum(r["label"] == "negative" for r in rows)
    n1 = len(rows) - n0
    assert n0 > 0 and n1 > 0
    data = tmp_path / "classify.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(folder, tmp_path / "eval.json", f"data={data}")
    assert result["num_examples"] == 40
    assert result["accuracy"] == pytest.approx(n0 / 40)
    assert result["macro_f1"] == pytest.approx(n0 / (2 * n0 + n1))


def test_classifier_with_a_random_head_matches_its_own_argmax(tiny_model, senti_dir, tmp_path):
    """An untrained head: the reported accuracy equals the agreement of the head's argmax with the labels."""
    tok = load_tokenizer(tiny_model)
    torch.manual_seed(0)
    clf = load_sequence_classifier(tiny_model, num_labels=2, id2label=["negative", "positive"], tokenizer=tok)
    folder = save_pretrained_atomic(clf, tok, tmp_path / "clf")
    rows = [json.loads(line) for line in (senti_dir / "classify.jsonl").read_text().splitlines()[:16]]
    data = tmp_path / "classify.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(folder, tmp_path / "eval.json", f"data={data}", "batch_size=5")
    with torch.no_grad():  # one row at a time: no padding at all
        preds = [int(clf(**tok(r["text"], return_tensors="pt")).logits.argmax(-1)) for r in rows]
    labels = [0 if r["label"] == "negative" else 1 for r in rows]
    assert result["accuracy"] == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / 16)


def test_bad_config_names_the_key(tiny_model, tmp_path, capsys):
    assert main(["eval", str(tiny_model), "num_samples=0", "task=arithmetic"]) == 2
    assert "num_samples" in capsys.readouterr().err
    assert main(["eval", str(tiny_model)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(tiny_model), "task=algebra"]) == 2
    assert "config key `task`: unknown value `algebra`" in capsys.readouterr().err
    assert not (tiny_model / "eval.json").exists()
