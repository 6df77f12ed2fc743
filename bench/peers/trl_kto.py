"""TRL KTOTrainer (TRL 1.16, `trl.KTOTrainer`) on a local model folder and an unpaired kto.jsonl.

    bench/.venv-peers/bin/python bench/peers/trl_kto.py --model M --data kto.jsonl --out r.json \
        --batch-size 8 --max-length 128 --steps 20 --lr 1e-6 --beta 0.1 --threads 1

TRL's defaults as a user gets them: `loss_type="kto"` (the KL reference point z0 from mismatched pairs), a
second, frozen reference model run every step (`precompute_ref_log_probs=False`), sequential sampling (TRL
requires it for the KL pairs: each row's mismatched completion is the previous row's within its batch-sized chunk
of the dataset, the first row taking the last's). Rows ``{"prompt", "completion", "label"}`` (strings, label a
bool) become one user turn and one assistant turn each. One step = ``--batch-size`` rows.

`tokens` counts the non-pad tokens of both forward inputs of every step: the rows (prompt + completion,
`attention_mask`) and their mismatched pairs (prompt + another row's completion, `KL_attention_mask`); the two
parts are also reported alone (`tokens_rows`, `tokens_kl`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--desirable-weight", type=float, default=1.0)
    ap.add_argument("--undesirable-weight", type=float, default=1.0)
    args = ap.parse_args()
    work = common.setup(args)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=common.model_dtype(args))
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"]}], "label": bool(r["label"])}
            for r in common.read_jsonl(args.data)]
    ds = Dataset.from_list(rows)
    cfg = KTOConfig(**common.common_training_args(args, work), beta=args.beta, loss_type="kto",
                    desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                    dataset_num_proc=None)
    cb = common.make_callback()
    parts = {"attention_mask": 0, "KL_attention_mask": 0}

    class Counting(KTOTrainer):  # the two parts apart; common.counting adds them up
        def training_step(self, model, inputs, *a, **k):
            for key in parts:
                parts[key] = parts[key] + inputs[key].sum()
            return super().training_step(model, inputs, *a, **k)

    trainer = Counting(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[cb])
    trainer.train()
    n_rows, n_kl = int(parts["attention_mask"]), int(parts["KL_attention_mask"])
    common.write_result(args.out, steps=cb.steps, tokens=n_rows + n_kl, wall_s=cb.wall_s, final_loss=cb.last_loss,
                        params=common.n_params(model), rows=len(ds), units=args.batch_size * cb.steps, unit="rows",
                        tokens_rows=n_rows, tokens_kl=n_kl)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
