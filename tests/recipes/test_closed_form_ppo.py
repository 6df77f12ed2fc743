"""PPO on a one-step problem converges to the KL-regularised optimum pi* = pi_ref * exp(r / beta) / Z.

The problem: one fixed prompt, one response token (rollout.max_new_tokens=1), reward r(y) known per
token. With the KL penalty in the reward (kl_coef = beta, k1) and gamma = 1, the return of an episode
is r(y) - beta * log(pi(y) / pi_ref(y)), whose expectation E_pi[r] - beta * KL(pi || pi_ref) is
maximised exactly by pi* (Rafailov et al. 2023, eq. 4; PAPERS.md). A single token has no EOS after
it, so missing_eos_penalty = 0 (else every response would be penalised alike, which only shifts r).

Vocabulary: a character-level tokenizer (~55 tokens). The K = 4 rewarded tokens are `a b c d`;
every other token gets r = -3, so that pi* keeps ~99% of its mass on the K tokens and the policy
samples them often. The check compares pi and pi* restricted to the K tokens and renormalised
(pi*'s restriction is pi_ref's restriction tilted by exp(r / beta), whatever the other tokens do).
"""

import math

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.cli import main

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \n+=?.,!")
REWARDS = {"a": 1.0, "b": 0.5, "c": 0.0, "d": -0.5}
OTHER = -3.0
BETA = 0.5
REWARD_FILE = f"""
R = {REWARDS!r}

def reward(prompts, completions):
    return [R.get(c, {OTHER}) for c in completions]
"""


def char_model(folder) -> None:
    """A 2-layer Llama (hidden 32) over a character vocabulary, with a ChatML template."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="?")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=2, bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def next_token_probs(folder, prompt: str) -> torch.Tensor:
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].softmax(-1)  # (V,)


def restricted(p: torch.Tensor, ids: list[int]) -> torch.Tensor:
    q = p[ids].double()
    return q / q.sum()


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


def test_ppo_converges_to_the_kl_regularised_optimum(tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "run"
    char_model(model_dir)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "reward.py").write_text(REWARD_FILE)
    args = ["ppo", f"model={model_dir}", f"prompts={tmp_path / 'prompts.jsonl'}", f"output_dir={out}",
            f"reward.function={tmp_path / 'reward.py'}:reward", "rollout.max_new_tokens=1", "rollout.batch_size=64",
            "total_episodes=1920", "mini_batch_size=32", "batch_size=32", "ppo_epochs=1", "learning_rate=1e-2",
            f"kl_coef={BETA}", "kl_estimator=k1", "gamma=1", "lam=1", "missing_eos_penalty=0", "critic_init=policy",
            "critic_learning_rate=1e-2", "logging.progress=false", "logging.steps=1000", "seed=0"]
    assert main(args) == 0

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    ids = [tok.convert_tokens_to_ids(c) for c in REWARDS]
    r = torch.tensor(list(REWARDS.values()), dtype=torch.float64)
    pi_ref = restricted(next_token_probs(model_dir, "hi"), ids)
    pi_star = pi_ref * torch.exp(r / BETA)
    pi_star = pi_star / pi_star.sum()
    pi = restricted(next_token_probs(out / "final", "hi"), ids)
    start, end = kl(pi_star, pi_ref), kl(pi_star, pi)
    print(f"pi_ref {pi_ref.tolist()}\npi*    {pi_star.tolist()}\npi     {pi.tolist()}\nKL start {start:.4f} end {end:.4f}")
    # pi_ref is ~uniform on the K tokens: KL(pi* || pi_ref) ~ 0.43 nats. After 30 iterations of 64 the gap is < 0.01 (measured: ~0.001).
    assert start > 0.3
    assert end < 0.01
