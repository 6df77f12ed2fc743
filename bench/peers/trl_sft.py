"""TRL SFTTrainer (TRL's current release) on a local model folder and sft.jsonl; writes a result JSON.

    bench/.venv-peers/bin/python bench/peers/trl_sft.py --model M --data sft.jsonl --out r.json \
        --batch-size 8 --max-length 512 --steps 20 --lr 2e-5 --threads 2

Rows ``{"messages": [...]}`` become TRL prompt-completion rows (completion = the last assistant turn,
prompt = the turns before it), so the loss covers the completion only, as posttrain's
``loss_on=completion``; the token ids are the same chat-template rendering. TRL's defaults otherwise:
no packing, each batch padded to its longest row (padding-free needs flash-attention, absent on CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def to_prompt_completion(row: dict) -> dict:
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return {"prompt": msgs[:last], "completion": msgs[last:last + 1]}


def main() -> int:
    args = common.parser(__doc__).parse_args()
    work = common.setup(args)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=common.model_dtype(args))
    ds = Dataset.from_list([to_prompt_completion(r) for r in common.read_jsonl(args.data)])
    cfg = SFTConfig(**common.common_training_args(args, work), packing=False, completion_only_loss=True,
                    dataset_num_proc=None)
    cb = common.make_callback()
    trainer = common.counting(SFTTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[cb])
    trainer.train()
    common.write_result(args.out, steps=cb.steps, tokens=trainer.bench_tokens, wall_s=cb.wall_s,
                        final_loss=cb.last_loss, params=common.n_params(model), rows=len(ds),
                        units=args.batch_size * cb.steps, unit="sequences")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
