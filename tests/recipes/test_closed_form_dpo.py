"""The closed form of DPO (Rafailov et al. 2023, eq. 4): `posttrain dpo` converges toward pi* = pi_ref exp(r/beta) / Z.

A one-step problem. Prompt x = "Pick one."; the answer is one of K = 4 single digits, each rendered as the
completion [digit, EOS] (two tokens: the sequence log-prob is log p(digit|x) + log p(EOS|x, digit)). Everything is
restricted to these K sequences: pi(y) for y in the set is the policy's sequence probability renormalised over the
set, which is the distribution DPO's pairwise loss sees.

- pi_ref: the untrained tiny model on those K sequences (the 4 digits are picked by its ranking: 1st, 4th, 7th,
  10th, so pi_ref is not uniform). Rewards r = (0, 0.5, 1, 1.5) go to the digits from the most to the least
  likely under pi_ref, so pi* moves mass against pi_ref: KL(pi* || pi_ref) = 0.54 nats on the default model.
- Data: pairs (y_i, y_j), i != j, drawn from pi_ref (each conditioned on the two differing) and labelled by the
  Bradley-Terry model P(y_i > y_j) = sigmoid(r_i - r_j). Instead of drawing them at random we write the expected
  number of each ordered (chosen, rejected) pair, M * q_i q_j sigmoid(r_i - r_j) / sum, rounded — repeated
  sampling without its noise. The BT log-likelihood of these counts is maximised, and the DPO loss minimised, at
  beta log(pi(y_i)/pi_ref(y_i)) - beta log(pi(y_j)/pi_ref(y_j)) = r_i - r_j, i.e. at pi = pi* on the K sequences.
- Run the real `posttrain dpo` (full-batch steps, constant learning rate), reload `final/`, measure
  KL(pi* || pi_trained). Bound: below 0.05 (a tenth of the untrained policy's) in the fast test, below 0.005
  with 4x the pairs and steps in the slow one.
"""

import json

import pytest
import torch

from posttrain.cli import main
from posttrain.data import PreferenceExample, collate_pairs, tokenize_preference
from posttrain.models import load_causal_lm, load_tokenizer
from posttrain.recipes.dpo import completion_logps

PROMPT = [{"role": "user", "content": "Pick one."}]
BETA = 0.5
REWARDS = torch.tensor([0.0, 0.5, 1.0, 1.5])


def set_distribution(model_dir, tok, answers: list[str]) -> torch.Tensor:
    """The model's distribution over the K sequences [answer, EOS] after the prompt, renormalised, (K,)."""
    return torch.softmax(answer_logps(model_dir, tok, answers).double(), 0)


def answer_logps(model_dir, tok, answers: list[str]) -> torch.Tensor:
    """The model's sequence log-probs of the K sequences [answer, EOS] after the prompt, (K,)."""
    model = load_causal_lm(model_dir, dtype="float32", device="cpu", tokenizer=tok).eval()
    items = []
    for a in answers:
        reply = [{"role": "assistant", "content": a}]
        items.append(tokenize_preference(tok, PreferenceExample(PROMPT, reply, reply), max_length=64))
    assert all(it["chosen_ids"][1:] == [tok.eos_token_id] and len(it["chosen_ids"]) == 2 for it in items)
    with torch.no_grad():
        logps, _ = completion_logps(model, collate_pairs(items, tok.pad_token_id))  # (2K,): chosen rows first
    return logps[: len(answers)]


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


def one_step_problem(tiny_model, out_dir, n_pairs):
    tok = load_tokenizer(tiny_model)
    digits = [str(d) for d in range(10)]
    ranked = torch.argsort(set_distribution(tiny_model, tok, digits), descending=True).tolist()
    answers = [digits[ranked[i]] for i in (0, 3, 6, 9)]
    q = set_distribution(tiny_model, tok, answers)  # (K,) pi_ref, most likely first
    p_star = torch.softmax(q.log() + REWARDS.double() / BETA, 0)  # (K,)
    weight = {(i, j): float(q[i] * q[j] * torch.sigmoid(REWARDS[i] - REWARDS[j]))
              for i in range(4) for j in range(4) if i != j}
    total = sum(weight.values())
    rows = []
    for (i, j), w in weight.items():
        rows += [{"prompt": "Pick one.", "chosen": answers[i], "rejected": answers[j]}] * round(n_pairs * w / total)
    data = out_dir / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tok, answers, q, p_star, data, len(rows)


def run_closed_form(tiny_model, tmp_path, n_pairs, steps, bound):
    tok, answers, q, p_star, data, n_rows = one_step_problem(tiny_model, tmp_path, n_pairs)
    kl_start = kl(p_star, q)
    assert kl_start > 0.3  # the untrained policy is far from the optimum
    out = tmp_path / "run"
    assert main(["dpo", f"model={tiny_model}", f"data.train={data}", f"output_dir={out}", f"batch_size={n_rows}",
                 f"max_steps={steps}", "learning_rate=3e-3", "lr_scheduler=constant", f"beta={BETA}",
                 "logging.progress=false", "data.shuffle=false"]) == 0
    trained = set_distribution(out / "final", tok, answers)
    kl_end = kl(p_star, trained)
    assert kl_end < bound < kl_start, (kl_end, kl_start, trained.tolist(), p_star.tolist())


def test_dpo_converges_to_the_closed_form(tiny_model, tmp_path):
    run_closed_form(tiny_model, tmp_path, n_pairs=60, steps=15, bound=0.05)


@pytest.mark.slow
def test_dpo_converges_to_the_closed_form_tightly(tiny_model, tmp_path):
    run_closed_form(tiny_model, tmp_path, n_pairs=240, steps=40, bound=0.005)
