"""`posttrain dpo`: sequence log-probs by hand, cached == live reference, LoRA reference == base, it learns."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.config import LoraConfig
from posttrain.data import collate_pairs, collate_shared_pairs
from posttrain.engine import read_metrics
from posttrain.models import apply_lora, load_causal_lm, load_tokenizer, token_logprobs
from posttrain.recipes.dpo import adapter_free_reference, cache_reference, completion_logps, frozen_reference
from tests.recipes.multiproc import assert_same_trained_weights, run_two_processes


def dpo_args(model, train, out, *extra, evals=None):
    return ["dpo", f"model={model}", f"data.train={train}", f"output_dir={out}", "batch_size=8", "max_length=64",
            "logging.progress=false", "logging.steps=1", "resume=false",
            *([f"data.eval={evals}"] if evals else []), *extra]


def records(out, key):
    return [r for r in read_metrics(out / "metrics.jsonl") if key in r]


@pytest.fixture(scope="module")
def tok_and_model(tiny_model):
    tok = load_tokenizer(tiny_model)
    return tok, load_causal_lm(tiny_model, dtype="float32", device="cpu", tokenizer=tok).eval()


@pytest.fixture(scope="module")
def other_model(tiny_model, tok_and_model, tmp_path_factory):
    """The tiny model with every weight perturbed: a reference that differs from the policy."""
    tok, _ = tok_and_model
    model = load_causal_lm(tiny_model, dtype="float32", device="cpu", tokenizer=tok)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("ref") / "ref"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def prefs_small(arith_dir, tmp_path_factory):
    """24 training and 8 held-out arithmetic pairs (rows of the task's prefs.jsonl)."""
    rows = (arith_dir / "prefs.jsonl").read_text().splitlines()
    d = tmp_path_factory.mktemp("prefs")
    (d / "train.jsonl").write_text("\n".join(rows[:24]) + "\n")
    (d / "eval.jsonl").write_text("\n".join(rows[24:32]) + "\n")
    return d


# --------------------------------------------------------------------------- sequence log-probs


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logprob_is_the_sum_over_completion_tokens(tok_and_model, side):
    """Two pairs of different lengths. Expected, by hand: run each prompt+completion ALONE (no padding) and add
    log p(token) over the completion's positions only: rows are [p1 p2 p3 | c1 c2] etc., so the completion
    log-prob is logp[t=2] + logp[t=3] (target t+1 = c1, c2). Padding side and the other rows never matter."""
    tok, model = tok_and_model
    items = [{"prompt_ids": [5, 17, 30], "chosen_ids": [41, 52], "rejected_ids": [63, 70, 81, 90]},
             {"prompt_ids": [8, 9, 10, 11, 12], "chosen_ids": [100], "rejected_ids": [101, 102]}]
    batch = collate_pairs(items, tok.pad_token_id, padding_side=side)
    with torch.no_grad():
        got, n_tokens = completion_logps(model, batch)  # (4,)
    rows = [(it["prompt_ids"], it[key]) for key in ("chosen_ids", "rejected_ids") for it in items]
    expected = []
    for prompt, completion in rows:
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            lp = token_logprobs(model, ids, torch.ones_like(ids))[0]  # (T-1,)
        expected.append(float(lp[len(prompt) - 1:].sum()))  # positions len(prompt)-1 .. T-2 predict the completion
    assert n_tokens.tolist() == [2, 1, 4, 2]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def test_left_and_right_padding_give_equal_values(tok_and_model):
    tok, model = tok_and_model
    items = [{"prompt_ids": list(range(3, 3 + n)), "chosen_ids": [40] * m, "rejected_ids": [50] * (4 - m)}
             for n, m in ((2, 1), (7, 3), (4, 2))]
    with torch.no_grad():
        right = completion_logps(model, collate_pairs(items, tok.pad_token_id, "right"))[0]
        left = completion_logps(model, collate_pairs(items, tok.pad_token_id, "left"))[0]
    assert torch.allclose(right, left, atol=1e-4)


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("shared", [False, True])
def test_cached_reference_lands_on_its_own_pair(tok_and_model, shared):
    """cache_reference runs the pairs sorted by row length, several to a batch; each item must still get the
    log-probs of its own pair, i.e. what that pair gives alone (lengths differ so that sorting reorders them)."""
    tok, model = tok_and_model
    items = [{"prompt_ids": list(range(3, 3 + n)), "chosen_ids": [40, 41] * m, "rejected_ids": [40, 42] * (4 - m)}
             for n, m in ((9, 3), (2, 1), (7, 3), (4, 2), (3, 1))]
    collate = collate_shared_pairs if shared else collate_pairs
    cache_reference(items, frozen_reference(model), tok.pad_token_id, "cpu", 2, collate)
    for it in items:
        alone = frozen_reference(model)(collate_pairs([it], tok.pad_token_id))  # (2,)
        assert [it["ref_chosen"], it["ref_rejected"]] == pytest.approx(alone.tolist(), abs=1e-4)



def test_lora_reference_is_the_base_model(tiny_model, tok_and_model, arith_dir):
    """A LoRA policy with a non-zero adapter: adapter disabled gives exactly the base model's log-probs."""
    tok, base = tok_and_model
    policy = apply_lora(load_causal_lm(tiny_model, dtype="float32", device="cpu", tokenizer=tok), LoraConfig(r=4))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    items = [{"prompt_ids": [5, 17, 30, 31], "chosen_ids": [41, 52, 2], "rejected_ids": [63, 2]}]
    pairs = collate_pairs(items, tok.pad_token_id)
    ref = adapter_free_reference(policy)(pairs)
    assert torch.allclose(ref, frozen_reference(base)(pairs), atol=1e-5)
    assert not torch.allclose(ref, frozen_reference(policy)(pairs), atol=1e-2)  # the adapter does change the policy


def test_cached_and_live_reference_give_the_same_first_step(tiny_model, other_model, prefs_small, tmp_path):
    """ref_model = a different model, so the step-1 loss is not log 2. Cached (one pass before training) and live
    (the reference model in memory) give the same loss and metrics at step 1 and the same held-out metrics."""
    metrics = {}
    for precompute in ("true", "false"):
        out = tmp_path / precompute
        assert main(dpo_args(tiny_model, prefs_small / "train.jsonl", out, "max_steps=1", f"ref_model={other_model}",
                             f"precompute_ref={precompute}", evals=prefs_small / "eval.jsonl")) == 0
        metrics[precompute] = (records(out, "loss")[0], records(out, "eval_loss")[0])
    (train_c, eval_c), (train_l, eval_l) = metrics["true"], metrics["false"]
    assert abs(train_c["loss"] - math.log(2)) > 0.05
    keys = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"]
    for key in keys + ["grad_norm"]:
        assert train_c[key] == pytest.approx(train_l[key], rel=1e-4, abs=1e-5), key
    for key in keys:
        assert eval_c[f"eval_{key}"] == pytest.approx(eval_l[f"eval_{key}"], rel=1e-4, abs=1e-5), key


def test_lora_cached_and_live_reference_agree_after_an_update(tiny_model, prefs_small, tmp_path):
    """LoRA: cached reference (pass before the adapter exists) == live reference (adapter disabled), also at
    step 2 when the adapter is no longer zero."""
    losses = {}
    for precompute in ("true", "false"):
        out = tmp_path / precompute
        assert main(dpo_args(tiny_model, prefs_small / "train.jsonl", out, "max_steps=2", "lora.r=4",
                             "learning_rate=1e-2", f"precompute_ref={precompute}")) == 0
        losses[precompute] = [v for r in records(out, "loss") for v in (r["loss"], r["rewards/margins"])]
    assert losses["true"][0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert losses["true"][3] != pytest.approx(0.0, abs=1e-6)  # the adapter moved
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4, abs=1e-6)
    assert (tmp_path / "true" / "final" / "adapter_config.json").is_file()


# --------------------------------------------------------------------------- the recipe


def sum_prefs(path, questions):
    """Chosen: the right answer. Rejected: a refusal. A surface preference a tiny model can learn in a few steps."""
    rows = [{"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}. The answer is {a + b}.",
             "rejected": "I do not know."} for a, b in questions]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_raises_held_out_preference_accuracy_and_saves_final(tiny_model, tmp_path):
    train = sum_prefs(tmp_path / "train.jsonl", [(a, b) for a in range(6) for b in range(6)])
    held = sum_prefs(tmp_path / "eval.jsonl", [(a, b) for a in range(6, 10) for b in range(6, 10)])
    out = tmp_path / "run"
    assert main(dpo_args(tiny_model, train, out, "max_steps=8", "learning_rate=3e-3", "beta=0.5",
                         "sft_weight=0.1", "logging.eval_steps=8", evals=held)) == 0
    first, last = records(out, "eval_loss")[0], records(out, "eval_loss")[-1]
    assert first["step"] == 0 and last["step"] == 8
    # step 0: policy == reference, every implicit reward is 0 (up to float error): no pair is ranked correctly on
    # purpose. After 8 steps the implicit reward ranks (nearly) every held-out pair right.
    assert abs(first["eval_rewards/margins"]) < 1e-4
    assert last["eval_rewards/accuracies"] >= 0.9 and last["eval_rewards/margins"] > 0.5
    assert last["eval_loss"] < first["eval_loss"]
    # step 1, by hand: the DPO term is log 2 (policy == reference), plus sft_weight * the chosen NLL
    step1 = records(out, "loss")[0]
    assert step1["loss"] == pytest.approx(math.log(2) + 0.1 * step1["nll_loss"], rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "grad_norm", "learning_rate"):
        assert key in step1
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size > 0 and (out / "final" / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust"])
def test_loss_variants_at_step_one(tiny_model, prefs_small, tmp_path, loss_type):
    """Policy == reference at step 1, so h = 0: ipo (0 - 1/(2 beta))^2 = 25 at beta 0.1; hinge relu(1 - 0) = 1;
    robust ((1-eps) log 2 - eps log 2) / (1 - 2 eps) = log 2 at any eps."""
    out = tmp_path / loss_type
    smoothing = ["label_smoothing=0.1"] if loss_type == "robust" else []  # refused with ipo / hinge, which ignore it
    assert main(dpo_args(tiny_model, prefs_small / "train.jsonl", out, "max_steps=1", f"loss_type={loss_type}",
                         *smoothing, "beta=0.1")) == 0
    expected = {"ipo": 25.0, "hinge": 1.0, "robust": math.log(2)}[loss_type]
    assert records(out, "loss")[0]["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("bad, key", [("loss_type=dpo", "loss_type"), ("beta=0", "beta"),
                                      ("label_smoothing=0.5", "label_smoothing")])
def test_bad_config_names_the_key(tiny_model, prefs_small, tmp_path, capsys, bad, key):
    assert main(dpo_args(tiny_model, prefs_small / "train.jsonl", tmp_path / "o", bad)) == 2
    assert key in capsys.readouterr().err


# --------------------------------------------------------------------------- reference-free losses


def one_pair(path):
    path.write_text(json.dumps({"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "I do not know."}) + "\n")
    return path


def _log_sig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type, extra", [("simpo", ["beta=2.0", "simpo_gamma=0.5"]),
                                              ("cpo", ["beta=0.1", "cpo_alpha=1.0"]), ("orpo", ["beta=0.1"])])
def test_reference_free_step_one_by_hand(tiny_model, tmp_path, capsys, loss_type, extra):
    """One pair, one step: the logged loss equals the loss_type's formula on the logged pieces —
    simpo: -log sig(r_c - r_r - 0.5) with r = rewards/* (beta * mean log-prob); cpo: -log sig(r_c - r_r) +
    1.0 * nll_loss; orpo: nll_loss - 0.1 * log_odds_ratio. And the run computes no reference pass."""
    out = tmp_path / loss_type
    assert main(dpo_args(tiny_model, one_pair(tmp_path / "one.jsonl"), out, "max_steps=1", f"loss_type={loss_type}",
                         *extra)) == 0
    assert "reference log-probs cached" not in capsys.readouterr().out
    r = records(out, "loss")[0]
    margin = r["rewards/chosen"] - r["rewards/rejected"]
    expected = {"simpo": lambda: -_log_sig(margin - 0.5), "cpo": lambda: -_log_sig(margin) + r.get("nll_loss", 0),
                "orpo": lambda: r.get("nll_loss", 0) - 0.1 * r.get("log_odds_ratio", 0)}[loss_type]()
    assert r["loss"] == pytest.approx(expected, rel=1e-4)
    assert r["logps/chosen"] < 0 and (out / "final" / "config.json").is_file()


def test_reference_free_accumulation_4x1_equals_1x4(tiny_model, prefs_small, tmp_path):
    """orpo (length-normalised, NLL term): 4 micro-batches of 1 pair == 1 of 4 in loss, metrics and weights."""
    outs = {}
    for name, batch, accum in (("a", 4, 1), ("b", 1, 4)):
        outs[name] = tmp_path / name
        assert main(dpo_args(tiny_model, prefs_small / "train.jsonl", outs[name], "max_steps=2", "loss_type=orpo",
                             f"batch_size={batch}", f"grad_accum={accum}", "learning_rate=1e-3",
                             "data.shuffle=false")) == 0
    ra, rb = records(outs["a"], "loss"), records(outs["b"], "loss")
    for a, b in zip(ra, rb, strict=True):
        for key in ("loss", "nll_loss", "log_odds_ratio", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert_same_trained_weights(outs["a"] / "final" / "model.safetensors", outs["b"] / "final" / "model.safetensors")


def test_a_paired_loss_on_a_row_without_rejected_names_file_row_and_field(tiny_model, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    assert main(dpo_args(tiny_model, data, tmp_path / "o", "loss_type=simpo")) != 0
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 2" in err and "`rejected`" in err
    assert not (tmp_path / "o" / "final").exists()


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_reference_free_two_processes_equal_one(tiny_model, prefs_small, tmp_path, loss_type):
    """2 gloo ranks x 4 pairs == 1 process x 8 pairs a step, for each reference-free loss."""
    common = ["max_steps=2", "dtype=float32", "learning_rate=1e-3", f"loss_type={loss_type}"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(dpo_args(tiny_model, prefs_small / "train.jsonl", one, *common)) == 0
    run_two_processes(dpo_args(tiny_model, prefs_small / "train.jsonl", two, *common, "batch_size=4"))
    for a, b in zip(records(one, "loss"), records(two, "loss"), strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert_same_trained_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_equal_one(tiny_model, prefs_small, tmp_path, strategy):
    """2 gloo ranks x 4 pairs == 1 process x 8 pairs a step, with the cached reference and a held-out eval: the
    same per-step losses and metrics, the same final weights (DDP, and FSDP2 with the weights sharded)."""
    common = ["max_steps=3", "dtype=float32", "learning_rate=1e-3", "beta=0.5"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(dpo_args(tiny_model, prefs_small / "train.jsonl", one, *common, evals=prefs_small / "eval.jsonl")) == 0
    run_two_processes(dpo_args(tiny_model, prefs_small / "train.jsonl", two, *common, "batch_size=4",
                               f"strategy={strategy}", evals=prefs_small / "eval.jsonl"))
    rows1, rows2 = ([r for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (one, two))
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] and len(rows1) >= 3
    for a, b in zip(rows1, rows2):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    # the held-out pass: each DDP rank scores half the pairs (FSDP2: every rank all of them), summed over the ranks
    evals1, evals2 = ([r for r in read_metrics(d / "metrics.jsonl") if "eval_loss" in r] for d in (one, two))
    assert [r["step"] for r in evals1] == [r["step"] for r in evals2] and len(evals1) >= 2
    for a, b in zip(evals1, evals2):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert_same_trained_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")
