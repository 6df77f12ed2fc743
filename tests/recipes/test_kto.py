"""`posttrain kto`: unpaired rows and unpaired pairs, the step-1 loss by hand, z0 over the whole step (accumulation
and ranks never change it), bad labels named, it learns."""

import json

import pytest

from posttrain.cli import main
from posttrain.engine import read_metrics
from posttrain.recipes.kto import assign_mismatched, unpair
from tests.recipes.multiproc import assert_same_trained_weights, run_two_processes


def kto_args(model, train, out, *extra, evals=None):
    return ["kto", f"model={model}", f"data.train={train}", f"output_dir={out}", "batch_size=8", "max_length=64",
            "logging.progress=false", "logging.steps=1", "resume=false",
            *([f"data.eval={evals}"] if evals else []), *extra]


def records(out, key):
    return [r for r in read_metrics(out / "metrics.jsonl") if key in r]


def sum_rows(path, questions, chat=False):
    """Unpaired rows: the right sum (true) and a refusal (false) for each question; `chat` as message lists."""
    rows = []
    for a, b in questions:
        for completion, label in ((f"{a} + {b} = {a + b}.", True), ("I do not know.", False)):
            prompt = f"What is {a} + {b}?"
            if chat:
                rows.append({"prompt": [{"role": "user", "content": prompt}],
                             "completion": [{"role": "assistant", "content": completion}], "label": label})
            else:
                rows.append({"prompt": prompt, "completion": completion, "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_are_unpaired_and_mismatched_completions_come_from_other_prompts():
    items = unpair([{"prompt_ids": [1, 2], "chosen_ids": [5], "rejected_ids": [6]},
                    {"prompt_ids": [3], "completion_ids": [7, 8], "desirable": False}])
    assert [(it["completion_ids"], it["desirable"]) for it in items] == [([5], True), ([6], False), ([7, 8], False)]
    assign_mismatched(items, seed=0, max_length=64)
    for it in items:
        assert it["kl_ids"] != it["completion_ids"]
    assert items[2]["kl_ids"] in ([5], [6])  # the only other prompt's completions


def test_step_one_is_half_the_weights_and_z0_is_zero(tiny_model, tmp_path):
    """Policy == reference at step 1 (dropout off): r = 0 and z0 = max(0, 0) = 0, so each row's loss is its weight
    * (1 - sig(0)) = weight / 2. Equal desirable and undesirable rows, weights 1 and 2: (0.5 + 1.0) / 2 = 0.75."""
    train = sum_rows(tmp_path / "t.jsonl", [(a, b) for a in range(2) for b in range(2)], chat=True)
    out = tmp_path / "run"
    assert main(kto_args(tiny_model, train, out, "max_steps=1", "undesirable_weight=2.0")) == 0
    r = records(out, "loss")[0]
    assert r["loss"] == pytest.approx(0.75, abs=1e-5) and r["kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(r["rewards/chosen"]) < 1e-4 and abs(r["rewards/rejected"]) < 1e-4
    assert (out / "final" / "config.json").is_file()


def test_kto_learns_from_preference_pairs_unpaired(tiny_model, tmp_path):
    """Preference rows, unpaired: after 8 steps the held-out desirable completions gain reward over the undesirable
    ones and the held-out loss falls."""
    def prefs(path, qs):
        path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.",
                                            "rejected": "I do not know."}) + "\n" for a, b in qs))
        return path
    train = prefs(tmp_path / "train.jsonl", [(a, b) for a in range(6) for b in range(6)])
    held = prefs(tmp_path / "eval.jsonl", [(a, b) for a in range(6, 9) for b in range(6, 9)])
    out = tmp_path / "run"
    assert main(kto_args(tiny_model, train, out, "max_steps=8", "learning_rate=3e-3", "beta=0.5",
                         "logging.eval_steps=8", evals=held)) == 0
    first, last = records(out, "eval_loss")[0], records(out, "eval_loss")[-1]
    assert last["eval_rewards/chosen"] - last["eval_rewards/rejected"] > 0.5
    assert last["eval_loss"] < first["eval_loss"] - 0.05


def test_accumulation_4x1_equals_1x4(tiny_model, tmp_path):
    """z0 is the mean over the step's 4 rows whether they come as one micro-batch of 4 or four of 1: the same loss,
    kl and weights (the paper's per-micro-batch z0 would differ: one mismatched row per micro-batch)."""
    rows = [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}.", "label": a != b}
            for a in range(3) for b in range(4)]  # mostly desirable: the mismatched completions gain too, z0 > 0
    train = tmp_path / "t.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    outs = {}
    for name, batch, accum in (("a", 4, 1), ("b", 1, 4)):
        outs[name] = tmp_path / name
        assert main(kto_args(tiny_model, train, outs[name], "max_steps=3", f"batch_size={batch}",
                             f"grad_accum={accum}", "learning_rate=3e-3", "data.shuffle=false")) == 0
    ra, rb = records(outs["a"], "loss"), records(outs["b"], "loss")
    assert ra[-1]["kl"] > 0  # the policy has moved: z0 is not trivially 0
    for a, b in zip(ra, rb, strict=True):
        for key in ("loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert_same_trained_weights(outs["a"] / "final" / "model.safetensors", outs["b"] / "final" / "model.safetensors")


@pytest.mark.parametrize("label", ["yes", 1, None])
def test_a_non_boolean_label_names_file_row_and_field(tiny_model, tmp_path, capsys, label):
    data = tmp_path / "bad.jsonl"
    rows = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "c", "label": label}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(kto_args(tiny_model, data, tmp_path / "o")) != 0
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 2" in err and "`label`" in err
    assert not (tmp_path / "o" / "final").exists()


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, tmp_path):
    """2 gloo ranks x 4 rows == 1 process x 8 rows a step, held-out eval included: z0 is combined over the ranks."""
    train = sum_rows(tmp_path / "t.jsonl", [(a, b) for a in range(3) for b in range(4)])
    held = sum_rows(tmp_path / "e.jsonl", [(a, b) for a in range(7, 9) for b in range(7, 9)])
    common = ["max_steps=3", "dtype=float32", "learning_rate=3e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(kto_args(tiny_model, train, one, *common, evals=held)) == 0
    run_two_processes(kto_args(tiny_model, train, two, *common, "batch_size=4", evals=held))
    for key in ("loss", "eval_loss"):
        for a, b in zip(records(one, key), records(two, key), strict=True):
            for k in a:
                if k not in ("tokens_per_second", "epoch"):
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert_same_trained_weights(one / "final" / "model.safetensors", two / "final" / "model.safetensors")
