"""TRL DPOTrainer (TRL's current release) on a local model folder and prefs.jsonl.

    bench/.venv-peers/bin/python bench/peers/trl_dpo.py --model M --data prefs.jsonl --out r.json \
        --batch-size 8 --max-length 512 --steps 20 --lr 1e-6 --beta 0.1 --threads 2

TRL's defaults as a user gets them: sigmoid loss, the reference model is a frozen copy of the policy
held in memory, and its log-probs are computed every step (``precompute_ref_log_probs=False``;
``--precompute-ref`` turns TRL's own caching on). Rows ``{"prompt", "chosen", "rejected"}`` (strings)
become one user turn and one assistant turn each. One step = ``--batch-size`` pairs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--precompute-ref", action="store_true", help="TRL's precompute_ref_log_probs=True")
    args = ap.parse_args()
    work = common.setup(args)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=common.model_dtype(args))
    ds = Dataset.from_list([common.as_conversation(r) for r in common.read_jsonl(args.data)])
    cfg = DPOConfig(**common.common_training_args(args, work), beta=args.beta, dataset_num_proc=None,
                    precompute_ref_log_probs=args.precompute_ref)
    cb = common.make_callback()
    trainer = common.counting(DPOTrainer)(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[cb])
    trainer.train()
    common.write_result(args.out, steps=cb.steps, tokens=trainer.bench_tokens, wall_s=cb.wall_s,
                        final_loss=cb.last_loss, params=common.n_params(model), rows=len(ds),
                        units=args.batch_size * cb.steps, unit="pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
