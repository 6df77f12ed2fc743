"""The one-step letter problem of test_closed_form_dpo.py (one prompt, K = 4 single-digit answers [digit, EOS],
rewards (0, 0.5, 1, 1.5) against pi_ref's ranking, Bradley-Terry pairs) for the rest of the preference family,
through the real commands: `posttrain kto` (the same pairs, unpaired) and `posttrain dpo` with loss_type simpo,
cpo, orpo and ipo.

Every method raises the best answer (reward 1.5, the LEAST likely of the four under pi_ref): after a few
full-batch steps it is the most likely of the four and its own sequence log-prob has risen.

IPO reaches its closed form. Every answer has |y| = 2 completion tokens, so IPO's length-normalised log-ratio of
answer k is u_k = (log pi(y_k) - log pi_ref(y_k)) / 2, and a pair (chosen i, rejected j) costs
(u_i - u_j - tau)^2 with tau = 1 / (2 beta). With c_ij pairs of each ordered kind the loss
sum_{i != j} c_ij (u_i - u_j - tau)^2 is a convex quadratic in u; d/du_k = 0 gives

    sum_j (c_kj + c_jk) (u_k - u_j) = tau * sum_j (c_kj - c_jk),   i.e. L u = tau * b

with L = diag(W 1) - W the Laplacian of W = C + C^T and b = (C - C^T) 1. L's null space is the constant vector
(the pairs connect all four answers): u is fixed up to a shift, and a shift of every log pi(y_k) is removed by
renormalising over the set, so the IPO optimum is pi_IPO(y_k) = pi_ref(y_k) exp(2 u_k) / Z for any solution u.
Unlike DPO's pi* it depends on the pair counts, not on the rewards that produced them: a pair shown both ways
pulls toward a finite log-ratio, never toward a deterministic policy (Azar et al. 2023, Sec. 5).
"""

import json

import pytest
import torch

from posttrain.cli import main
from tests.recipes.test_closed_form_dpo import BETA, answer_logps, kl, one_step_problem, set_distribution


def train(method: str, model, data, n_rows: int, out, steps: int) -> None:
    """`posttrain kto` on the pairs unpaired (2 rows a pair: the batch is every row), else `posttrain dpo`."""
    command = ["kto", f"batch_size={2 * n_rows}"] if method == "kto" else ["dpo", f"loss_type={method}",
                                                                           f"batch_size={n_rows}"]
    assert main([*command, f"model={model}", f"data.train={data}", f"output_dir={out}", f"max_steps={steps}",
                 "learning_rate=3e-3", "lr_scheduler=constant", f"beta={BETA}", "data.eval_split=0",
                 "logging.progress=false", "data.shuffle=false", "resume=false"]) == 0


@pytest.mark.parametrize("method", ["kto", "simpo", "cpo", "orpo", "ipo"])
def test_every_method_raises_the_best_answer(method, tiny_model, tmp_path):
    tok, answers, q, _, data, n_rows = one_step_problem(tiny_model, tmp_path, n_pairs=60)
    assert int(q.argmin()) == 3  # the best answer starts as the least likely
    start = answer_logps(tiny_model, tok, answers)
    train(method, tiny_model, data, n_rows, tmp_path / "run", steps=4)
    trained = answer_logps(tmp_path / "run" / "final", tok, answers)
    assert int(trained.argmax()) == 3, (trained.softmax(0).tolist(), q.tolist())
    assert trained[3] > start[3] + 0.3, (trained.tolist(), start.tolist())


def ipo_optimum(data, answers: list[str], q: torch.Tensor) -> torch.Tensor:
    """pi_IPO on the set (module doc) from the pair counts in `data`, (K,)."""
    counts = torch.zeros(len(answers), len(answers), dtype=torch.float64)  # C[i, j]: pairs (chosen i, rejected j)
    for line in data.read_text().splitlines():
        row = json.loads(line)
        counts[answers.index(row["chosen"]), answers.index(row["rejected"])] += 1
    w = counts + counts.T
    laplacian = torch.diag(w.sum(1)) - w
    b = (counts - counts.T).sum(1) / (2 * BETA)
    u = torch.linalg.lstsq(laplacian, b.unsqueeze(1)).solution.squeeze(1)  # (K,) one solution of L u = tau b
    return torch.softmax(q.log() + 2 * u, 0)


def run_ipo(tiny_model, tmp_path, n_pairs, steps, bound):
    tok, answers, q, _, data, n_rows = one_step_problem(tiny_model, tmp_path, n_pairs)
    p_ipo = ipo_optimum(data, answers, q)
    kl_start = kl(p_ipo, q)
    assert kl_start > 0.1  # the untrained policy is far from the optimum
    train("ipo", tiny_model, data, n_rows, tmp_path / "run", steps)
    kl_end = kl(p_ipo, set_distribution(tmp_path / "run" / "final", tok, answers))
    assert kl_end < bound < kl_start, (kl_end, kl_start, p_ipo.tolist())


def test_ipo_converges_to_its_closed_form(tiny_model, tmp_path):
    run_ipo(tiny_model, tmp_path, n_pairs=60, steps=15, bound=0.005)  # measured 0.0006 (from 0.14)


@pytest.mark.slow
def test_ipo_converges_to_its_closed_form_tightly(tiny_model, tmp_path):
    run_ipo(tiny_model, tmp_path, n_pairs=240, steps=40, bound=0.001)  # measured 0.0002 (from 0.13)
