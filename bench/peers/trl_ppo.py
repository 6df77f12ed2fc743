"""TRL's last PPOTrainer (TRL 1.12.0, ``trl.experimental.ppo``) on a local policy + reward model.

    bench/.venv-peers-ppo/bin/python bench/peers/trl_ppo.py --model M --reward-model RM --data prompts.jsonl \
        --out r.json --rollout-batch 16 --mini-batches 2 --ppo-epochs 2 --response-length 32 --steps 4 \
        --lr 1e-5 --threads 2

One step = one PPO iteration: ``--rollout-batch`` episodes sampled (KV-cached ``generate``), then
``--ppo-epochs`` passes over them in ``--mini-batches`` optimizer steps each
(per_device_train_batch_size = rollout batch, gradient_accumulation_steps = 1, so each minibatch is one
optimizer step with no accumulation). The value model starts from ``--reward-model`` (TRL's recipe);
the reference is a second frozen copy of the policy. Sampling at temperature 1, no top-k/top-p,
stop at EOS, ``missing_eos_penalty`` 1.0 subtracted from the score of a response without EOS.

tokens = prompt tokens + response tokens through the first EOS, once per episode (counted by wrapping
TRL's module-level ``batch_generation`` and ``truncate_response``; nothing else changes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--reward-model", required=True, help="scalar-head folder: reward model and value-model init")
    ap.add_argument("--rollout-batch", type=int, default=16, help="episodes per PPO iteration")
    ap.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per PPO epoch")
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--kl-coef", type=float, default=0.05)
    ap.add_argument("--vf-coef", type=float, default=0.1)
    args = ap.parse_args()
    work = common.setup(args)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    tok = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    counts = {"prompt": 0, "response": 0}
    orig_gen, orig_trunc = ppo_mod.batch_generation, ppo_mod.truncate_response

    def batch_generation(model, queries, *a, **k):
        counts["prompt"] += int((queries != tok.pad_token_id).sum())
        return orig_gen(model, queries, *a, **k)

    def truncate_response(stop_token_id, pad_token_id, responses):
        out = orig_trunc(stop_token_id, pad_token_id, responses)
        counts["response"] += int((out != pad_token_id).sum())
        return out

    ppo_mod.batch_generation, ppo_mod.truncate_response = batch_generation, truncate_response

    weights = dict(dtype=common.model_dtype(args))  # float32 on the CPU, bfloat16 on CUDA
    policy = AutoModelForCausalLM.from_pretrained(args.model, **weights)
    ref = AutoModelForCausalLM.from_pretrained(args.model, **weights)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, **weights)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward_model, num_labels=1, **weights)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id

    def encode(row):
        msgs = common.as_conversation(row)["prompt"]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return {"input_ids": ids[-args.max_length:]}

    rows = common.read_jsonl(args.data)
    ds = Dataset.from_list([encode(r) for r in rows])
    cfg = PPOConfig(
        output_dir=str(work), per_device_train_batch_size=args.rollout_batch, gradient_accumulation_steps=1,
        num_mini_batches=args.mini_batches, num_ppo_epochs=args.ppo_epochs,
        total_episodes=args.rollout_batch * args.steps, local_rollout_forward_batch_size=args.rollout_batch,
        response_length=args.response_length, stop_token="eos", temperature=1.0, missing_eos_penalty=1.0,
        kl_coef=args.kl_coef, kl_estimator="k1", cliprange=0.2, vf_coef=args.vf_coef, cliprange_value=0.2,
        gamma=1.0, lam=0.95, whiten_rewards=False, num_sample_generations=0, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=args.device == "cpu", bf16=args.device == "cuda", fp16=False, seed=args.seed,
        dataloader_num_workers=0,
    )
    cb = common.make_callback()
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=ds, value_model=value, callbacks=[cb])
    trainer.train()
    last = next((lg for lg in reversed(cb.logs) if "loss/policy_avg" in lg), {})
    loss = last.get("loss/policy_avg", 0.0) + args.vf_coef * last.get("loss/value_avg", 0.0) if last else None
    common.write_result(args.out, steps=cb.steps, tokens=counts["prompt"] + counts["response"], wall_s=cb.wall_s,
                        final_loss=loss, params=common.n_params(policy, value), rows=len(ds),
                        units=args.rollout_batch * cb.steps, unit="episodes",
                        response_tokens=counts["response"], prompt_tokens=counts["prompt"],
                        score=last.get("objective/scores"), kl=last.get("objective/kl"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
