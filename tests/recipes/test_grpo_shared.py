"""GRPO's shared-prompt forward (`share_prompt_forward`): each group's prompt runs once and its completions on its
KV cache. The log-probs, entropies and the loss's gradient equal the per-row layout's (float32, left-padded prompts
of different lengths, completions of different lengths); the fallbacks; the key is honoured; micro-batches hold
whole groups."""

import copy

import pytest
import torch

import posttrain.recipes.grpo as grpo
from posttrain.cli import main
from posttrain.config import GRPOConfig, LoraConfig
from posttrain.engine.dist import RolloutShare
from posttrain.models import apply_lora, load_causal_lm, load_tokenizer, token_logprobs
from posttrain.models.forward import prompt_groups, shared_prompt_logprobs, shared_prompt_unsupported
from posttrain.recipes.grpo import Generation, grpo_loss_fn, make_experience, shares_prompt
from posttrain.rollout.sampler import assemble_batch

G = 4


def rows(tok, n_prompts=3, seed=0):
    """3 prompts of different lengths (left-padded), G completions each of 1..7 tokens (some ending in EOS)."""
    gen = torch.Generator().manual_seed(seed)
    questions = ("1+2=?", "what is 30 + 4, and then 12 - 5, please?", "7?")[:n_prompts]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in questions]
    responses, index = [], []
    for i in range(len(prompts)):
        for _ in range(G):
            n = int(torch.randint(1, 8, (1,), generator=gen))
            resp = torch.randint(10, 200, (n,), generator=gen).tolist()
            if torch.rand(1, generator=gen) < 0.5:
                resp[-1] = tok.eos_token_id
            responses.append(resp)
            index.append(i)
    logprobs = [[-1.0] * len(r) for r in responses]
    batch = assemble_batch([list(p) for p in prompts], responses, logprobs, index, eos_id=tok.eos_token_id,
                           pad_id=tok.pad_token_id)
    assert len({len(p) for p in prompts}) == len(prompts) and (batch.response_mask == 0).any()
    return batch


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    tok = load_tokenizer(tiny_model)
    return load_causal_lm(tiny_model, tokenizer=tok), tok


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("lora", [False, True])
def test_log_probs_and_entropies_equal_the_per_row_layout(model_tok, lora):
    model, tok = model_tok
    model = copy.deepcopy(model)
    if lora:
        model = apply_lora(model, LoraConfig(r=4), "causal_lm")
    assert shared_prompt_unsupported(model) is None
    batch = rows(tok)
    p, mask = batch.prompt_width, batch.response_mask.bool()
    assert prompt_groups(batch.sequences, batch.attention_mask, p).tolist() == [i // G for i in range(3 * G)]
    want, want_h = token_logprobs(model, batch.sequences, batch.attention_mask, return_entropy=True, start=p - 1)
    got, got_h = shared_prompt_logprobs(model, batch.sequences, batch.attention_mask, p, return_entropy=True)
    assert got.shape == want.shape == mask.shape
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_h[mask], want_h[mask], atol=1e-5, rtol=1e-5)
    # a micro-batch without the longest prompt: its leading all-padding columns are dropped from the prompt pass
    short = torch.tensor([i for i in range(3 * G) if i // G != 1])
    ids, attn = batch.sequences[short], batch.attention_mask[short]
    assert not attn[:, 0].any()
    want = token_logprobs(model, ids, attn, start=p - 1)
    got = shared_prompt_logprobs(model, ids, attn, p)
    torch.testing.assert_close(got[mask[short]], want[mask[short]], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("keys", [{"loss_type": "grpo"}, {"loss_type": "dapo", "beta": 0.3},
                                  {"loss_type": "bnpo", "importance_sampling_level": "sequence"}])
def test_loss_and_gradient_equal_the_per_row_layout(model_tok, keys):
    """grpo_loss_fn's loss, stats and gradient (old log-probs moved off the policy's, so the clip is live; the KL in
    the loss with beta) with the shared prompts equal the per-row layout's."""
    model, tok = model_tok
    model = copy.deepcopy(model)
    batch = rows(tok, seed=1)
    cfg = GRPOConfig(num_generations=G, epsilon=0.05, **keys)
    cfg.rollout.max_new_tokens = batch.response_ids.shape[1]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.lm_head.weight.mul_(1.2)
    scores = torch.arange(3 * G, dtype=torch.float32) % 3
    gen = Generation(batch, scores, [""] * 3 * G, [[{"role": "user", "content": ""}]] * 3 * G, {})
    share = RolloutShare(3, G, None)
    exp, _ = make_experience(cfg, model, ref, gen, None, share)
    exp_rows, _ = make_experience(cfg, model, ref, gen, None, share)
    if exp.ref_logp is not None:  # make_experience's reference pass took the shared layout
        with torch.no_grad():
            per_row = grpo.response_logprobs(ref, batch, 1.0, shared=False)
        torch.testing.assert_close(exp.ref_logp[exp.mask], per_row[exp.mask], atol=1e-5, rtol=1e-5)
    exp.old_logp = exp.old_logp + 0.3 * torch.randn(exp.old_logp.shape, generator=torch.Generator().manual_seed(2))
    exp_rows.old_logp = exp.old_logp
    out = {}
    for shared, e in ((True, exp), (False, exp_rows)):
        model.zero_grad()
        loss, stats = grpo_loss_fn(cfg, shared)(model, e)
        loss.backward()
        out[shared] = loss.detach(), {k: v[0] for k, v in stats.items() if isinstance(v, tuple)}, grads(model)
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    assert out[True][1].keys() == out[False][1].keys() and "entropy" in out[True][1]
    for k in out[True][1]:
        torch.testing.assert_close(out[True][1][k], out[False][1][k], atol=1e-5, rtol=1e-5)
    assert out[True][2].abs().max() > 1e-3
    torch.testing.assert_close(out[True][2], out[False][2], atol=1e-5, rtol=1e-5)


def test_fallbacks(model_tok, tiny_model):
    """The per-row layout where the shared one is not exact or not supported, and when the key is off."""
    model, _ = model_tok
    assert shares_prompt(GRPOConfig(), model) and not shares_prompt(GRPOConfig(share_prompt_forward=False), model)
    ckpt = load_causal_lm(tiny_model, tokenizer=load_tokenizer(tiny_model), gradient_checkpointing=True)
    assert "gradient checkpointing" in shared_prompt_unsupported(ckpt)
    window = copy.deepcopy(model)
    window.config.sliding_window = 4
    assert "sliding-window" in shared_prompt_unsupported(window)
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "flash_attention_2"
    assert "attention" in shared_prompt_unsupported(eager)


@pytest.mark.parametrize("flag", ["true", "false"])
def test_the_key_is_honoured_and_micro_batches_hold_whole_groups(tiny_model, arith_dir, tmp_path, monkeypatch, flag,
                                                                  capsys):
    """share_prompt_forward=false never calls the shared forward, true does; every training micro-batch is whole
    groups (batch_size 2 < num_generations 4 rounds to one group; 6 rounds down to one)."""
    calls, shapes = [], []
    real_shared, real_rows = grpo.shared_prompt_logprobs, grpo.token_logprobs

    def shared(model, input_ids, *a, **k):
        calls.append(input_ids.shape[0])
        return real_shared(model, input_ids, *a, **k)

    def per_row(model, input_ids, *a, **k):
        if k.get("return_entropy"):
            shapes.append(input_ids.shape[0])
        return real_rows(model, input_ids, *a, **k)

    monkeypatch.setattr(grpo, "shared_prompt_logprobs", shared)
    monkeypatch.setattr(grpo, "token_logprobs", per_row)
    for bs in (2, 6):
        assert main(["grpo", f"model={tiny_model}", f"prompts={arith_dir / 'prompts.jsonl'}",
                     f"output_dir={tmp_path / str(bs)}", "reward.task=arithmetic", "rollout.batch_size=8",
                     "num_generations=4", "rollout.max_new_tokens=6", "total_episodes=8", f"batch_size={bs}",
                     "beta=0.1", "logging.progress=false", f"share_prompt_forward={flag}"]) == 0
    seen = calls if flag == "true" else shapes
    assert (len(calls) > 0) == (flag == "true") and (len(shapes) > 0) == (flag == "false")
    # per run: the reference pass over the generation's 8 rows (shared), then 2 micro-batches of one group
    assert seen == ([8, 4, 4] if flag == "true" else [4, 4]) * 2, seen
    assert ("every completion with its prompt (share_prompt_forward=false)" in capsys.readouterr().out) == (flag == "false")


def test_a_step_slice_must_hold_whole_groups(tiny_model, arith_dir, tmp_path, capsys):
    assert main(["grpo", f"model={tiny_model}", f"prompts={arith_dir / 'prompts.jsonl'}", f"output_dir={tmp_path}",
                 "rollout.batch_size=8", "num_generations=4", "steps_per_generation=4"]) == 2
    assert "whole groups of `num_generations`" in capsys.readouterr().err
