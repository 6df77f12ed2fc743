#!/usr/bin/env bash
# The package as a user gets it: build the wheel, install it into a fresh venv outside the checkout, and from a
# temporary folder (no examples/, no src/) run `posttrain demo --quick` and the README's step-by-step commands
# with tiny step counts: every recipe, eval and generate, the shipped example configs, `task:` data sources.
# Usage: .ci/wheel_smoke.sh [PYTHON]   (PYTHON builds the wheel and the venv; default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

rm -rf build  # setuptools copies into build/lib and never removes: a stale file would ship in the wheel
"$py" -m pip wheel . --no-deps -q -w "$work/dist"
rm -rf build
"$py" -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
$pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then  # as in the Makefile: the CPU build of torch where there is no CUDA
  $pip install -q "torch>=2.4"
else
  $pip install -q torch==2.13.0
fi
$pip install -q "$work"/dist/posttrain-*.whl

mkdir "$work/user"
cd "$work/user"
unset PYTHONPATH
export POSTTRAIN_CACHE="$work/cache" PATH="$work/venv/bin:$PATH"
set -x
python -c "import posttrain, sys; sys.exit(not posttrain.__file__.startswith('$work/venv/'))"  # the wheel's copy
posttrain examples > examples.txt && grep -q "examples/ppo_tiny.yaml" examples.txt  # the whole list (grep -q would close the pipe early)
posttrain examples copied && test -f copied/demo/sentiment/rm.yaml
posttrain demo --quick
test -s runs/demo/report.md && grep -q "Claims of the background paper" runs/demo/report.md

posttrain tiny-model runs/tiny
posttrain sft examples/sft_tiny.yaml max_steps=2 batch_size=8 logging.eval_steps=2 save.steps=0
posttrain sft examples/sft_classify.yaml max_steps=2 batch_size=8 logging.eval_steps=2
posttrain task arithmetic data/arith n_train=16 n_eval=4
posttrain rm examples/rm_tiny.yaml max_steps=2 data.max_rows=64 batch_size=8 logging.eval_steps=2 save.steps=0
posttrain ppo examples/ppo_tiny.yaml total_episodes=8 rollout.batch_size=8 mini_batch_size=8 batch_size=8 \
  ppo_epochs=1 eval_prompts=4 save.steps=0
posttrain ppo examples/ppo_tiny.yaml output_dir=runs/grpo-tiny advantage_estimator=grpo \
  rollout.samples_per_prompt=4 total_episodes=8 rollout.batch_size=8 mini_batch_size=8 \
  batch_size=8 ppo_epochs=1 eval_prompts=4 save.steps=0
posttrain grpo examples/grpo_tiny.yaml output_dir=runs/grpo-cmd-tiny total_episodes=8 rollout.batch_size=8 \
  num_generations=4 steps_per_generation=1 batch_size=8 eval_prompts=4 save.steps=0
posttrain ppo examples/ppo_math.yaml model=runs/tiny total_episodes=8 rollout.batch_size=8 mini_batch_size=8 \
  batch_size=8 ppo_epochs=1 eval_prompts=4 rollout.max_new_tokens=8
posttrain dpo examples/dpo_tiny.yaml max_steps=2 data.max_rows=64 batch_size=8 logging.eval_steps=2 save.steps=0
posttrain kto examples/kto_tiny.yaml max_steps=2 data.max_rows=64 batch_size=8 logging.eval_steps=2 save.steps=0
posttrain dpo examples/simpo_tiny.yaml max_steps=2 data.max_rows=64 batch_size=8 logging.eval_steps=2 save.steps=0
posttrain dpo examples/orpo_tiny.yaml max_steps=2 data.max_rows=64 batch_size=8 logging.eval_steps=2 save.steps=0
posttrain online-dpo examples/online_dpo_tiny.yaml rounds=1 prompts_per_round=4 samples_per_prompt=2 batch_size=4 \
  eval_prompts=4
posttrain eval runs/ppo-tiny/final task=arithmetic ref_model=runs/sft-tiny/final num_prompts=4 num_samples=2
posttrain generate runs/ppo-tiny/final "What is 3 + 4 - 2?" rollout.max_new_tokens=16
posttrain report runs/sft-tiny runs/ppo-tiny
for run in sft-tiny sentiment-classifier rm-tiny ppo-tiny grpo-tiny grpo-cmd-tiny ppo-math dpo-tiny kto-tiny simpo-tiny \
    orpo-tiny online-dpo-tiny; do
  test -f "runs/$run/final/config.json"
done
set +x
