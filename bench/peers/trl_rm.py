"""TRL RewardTrainer (TRL's current release) on a sequence-classifier folder and prefs.jsonl.

    bench/.venv-peers/bin/python bench/peers/trl_rm.py --model RM_INIT --data prefs.jsonl --out r.json \
        --batch-size 8 --max-length 512 --steps 20 --lr 1e-5 --threads 2

``--model`` is a folder with a scalar head (num_labels=1) so that both sides start from the same
head; a plain causal-LM folder also works (TRL then adds a random head). Rows
``{"prompt", "chosen", "rejected"}`` (strings) become one user turn and one assistant turn each.
One step = ``--batch-size`` pairs, chosen and rejected in one padded forward (TRL's collator).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    args = common.parser(__doc__).parse_args()
    work = common.setup(args)
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=common.model_dtype(args))
    model.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_list([common.as_conversation(r) for r in common.read_jsonl(args.data)])
    cfg = RewardConfig(**common.common_training_args(args, work), dataset_num_proc=None)
    cb = common.make_callback()
    trainer = common.counting(RewardTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[cb])
    trainer.train()
    common.write_result(args.out, steps=cb.steps, tokens=trainer.bench_tokens, wall_s=cb.wall_s,
                        final_loss=cb.last_loss, params=common.n_params(model), rows=len(ds),
                        units=args.batch_size * cb.steps, unit="pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
