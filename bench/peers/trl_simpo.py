"""TRL CPOTrainer with SimPO settings (TRL's current release, `trl.experimental.cpo`) on a local model folder
and prefs.jsonl.

    bench/.venv-peers/bin/python bench/peers/trl_simpo.py --model M --data prefs.jsonl --out r.json \
        --batch-size 8 --max-length 512 --steps 20 --lr 1e-6 --beta 2.0 --simpo-gamma 0.5 --threads 2

SimPO as TRL documents it: `loss_type="simpo"`, `cpo_alpha=0` (no NLL term), no reference model; the reward is
beta times the length-normalised log-prob, the target margin `simpo_gamma` (loss -log sig(beta (a_c - a_r) -
simpo_gamma), posttrain's `loss_type=simpo`). Rows ``{"prompt", "chosen", "rejected"}`` (strings) become one user
turn and one assistant turn each. One step = ``--batch-size`` pairs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--simpo-gamma", type=float, default=0.5)
    args = ap.parse_args()
    work = common.setup(args)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=common.model_dtype(args))
    ds = Dataset.from_list([common.as_conversation(r) for r in common.read_jsonl(args.data)])
    cfg = CPOConfig(**common.common_training_args(args, work), beta=args.beta, loss_type="simpo", cpo_alpha=0.0,
                    simpo_gamma=args.simpo_gamma, dataset_num_proc=None)
    cb = common.make_callback()
    trainer = common.counting(CPOTrainer, ("chosen_attention_mask", "rejected_attention_mask"))(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[cb])
    trainer.train()
    common.write_result(args.out, steps=cb.steps, tokens=trainer.bench_tokens, wall_s=cb.wall_s,
                        final_loss=cb.last_loss, params=common.n_params(model), rows=len(ds),
                        units=args.batch_size * cb.steps, unit="pairs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
