"""TRL 1.16's ``GRPOTrainer`` (no vLLM: ``generate`` with the KV cache) on a local policy and arithmetic prompts.

    bench/.venv-peers/bin/python bench/peers/trl_grpo.py --model M --data prompts.jsonl --out r.json \
        --num-generations 8 --generation-batch 32 --steps-per-generation 2 --batch-size 16 \
        --response-length 32 --steps 16 --lr 1e-5 --threads 1

One step = one optimizer step of ``--batch-size`` completions (gradient_accumulation_steps = 1); a generation
of ``--generation-batch`` completions (``--generation-batch / --num-generations`` prompts x ``--num-generations``)
feeds ``--steps-per-generation`` steps. TRL's defaults otherwise: ``beta`` 0 (no reference model),
``loss_type`` dapo, ``scale_rewards`` group, ``epsilon`` 0.2, ``num_iterations`` 1, temperature 1, no top-k /
top-p, generation stops at EOS.

The reward is the arithmetic task's rule (``posttrain task arithmetic``): 1.0 when the completion has exactly one
``The answer is N`` and N is the value of the prompt's sum, else 0.0 -- written here so the peer's environment
needs no posttrain; its cost is a regex per completion on both sides.

tokens = prompt tokens + completion tokens through the first EOS of every episode (the sums of TRL's own
``prompt_mask`` and ``completion_mask`` of each generation; nothing else changes).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

QUESTION = re.compile(r"What is\s+(\d+(?:\s*[-+]\s*\d+)+)\s*\?")
ANSWER = re.compile(r"The\s+answer\s+is\s+(-?\d+)(?=\.?(?:\s|$))")
TERM = re.compile(r"([-+]?)\s*(\d+)")


def arithmetic(prompts, completions, **_) -> list[float]:
    out = []
    for p, c in zip(prompts, completions):
        q = QUESTION.search(p[-1]["content"] if isinstance(p, list) else p)
        text = c[-1]["content"] if isinstance(c, list) else c
        found = ANSWER.findall(text)
        value = sum(int(n) * (-1 if s == "-" else 1) for s, n in TERM.findall(q.group(1))) if q else None
        out.append(1.0 if len(found) == 1 and value is not None and int(found[0]) == value else 0.0)
    return out


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--generation-batch", type=int, default=32, help="completions per generation")
    ap.add_argument("--steps-per-generation", type=int, default=2)
    ap.add_argument("--response-length", type=int, default=32, help="max_completion_length")
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight (TRL's default 0: no reference model)")
    ap.add_argument("--loss-type", default="dapo", help="TRL's loss_type (default dapo, TRL's)")
    ap.add_argument("--save", default="", help="save the trained model to this folder (for a held-out evaluation)")
    args = ap.parse_args()
    work = common.setup(args)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=common.model_dtype(args))
    ds = Dataset.from_list([{"prompt": common.as_conversation(r)["prompt"]} for r in common.read_jsonl(args.data)])
    train_args = common.common_training_args(args, work)
    train_args.pop("max_length")  # GRPOConfig has no max_length: prompts are short, completions capped below
    cfg = GRPOConfig(**train_args, num_generations=args.num_generations,
                     generation_batch_size=args.generation_batch, max_completion_length=args.response_length,
                     temperature=1.0, beta=args.beta, loss_type=args.loss_type, scale_rewards="group", num_iterations=1,
                     use_vllm=False, disable_dropout=True, shuffle_dataset=True)
    if cfg.steps_per_generation != args.steps_per_generation:
        raise SystemExit(f"TRL derived steps_per_generation={cfg.steps_per_generation}, "
                         f"the plan says {args.steps_per_generation}")
    counted = {"tokens": 0, "episodes": 0}

    class Counting(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            counted["tokens"] += int(out["prompt_mask"].sum()) + int(out["completion_mask"].sum())
            counted["episodes"] += int(out["completion_mask"].shape[0])
            return out

    cb = common.make_callback()
    trainer = Counting(model=model, reward_funcs=[arithmetic], args=cfg, train_dataset=ds, processing_class=tok,
                       callbacks=[cb])
    trainer.train()
    if args.save:
        trainer.save_model(args.save)
        tok.save_pretrained(args.save)
    rewards = [lg["reward"] for lg in cb.logs if "reward" in lg]
    common.write_result(args.out, steps=cb.steps, tokens=counted["tokens"], wall_s=cb.wall_s,
                        final_loss=cb.last_loss, params=common.n_params(model), rows=len(ds),
                        units=counted["episodes"], unit="episodes",
                        mean_reward=sum(rewards) / len(rewards) if rewards else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
