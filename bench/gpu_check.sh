#!/usr/bin/env bash
# One run on a GPU machine (bench/README.md, "On a GPU"): posttrain's CUDA smoke tests, then posttrain vs TRL on
# the GPU. From the repo root, with the wheels of .whl/ beside it (see the README for the list):
#
#   OUT=/some/folder bash bench/gpu_check.sh
#
# Writes under $OUT: log.txt (everything), smoke.md (pass/fail + error tail of each smoke stage), results-gpu.md
# (bench/run.py --device cuda), raw-gpu.json (every measurement), bench-logs.tgz (each run's log).
# Every stage is time-boxed with `timeout`; the whole run is sized to end within GPU_CHECK_SECONDS (default 390).
# GPU_CHECK_DEVICE=cpu is a dry run of the same stages on a CPU machine with the project's venvs (no install, FSDP2
# over gloo, bench --quick): it checks the script, not the GPU.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-/tmp/gpu-check-out}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
DEADLINE="${GPU_CHECK_SECONDS:-390}"
W="${GPU_CHECK_WORK:-/tmp/gpu-check-work}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu-check-site}"
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE=$!
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
say() { echo "[t=$(el)s] $*"; }
left() { echo $(( DEADLINE - $(date +%s) + T0 )); }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false \
  TRL_EXPERIMENTAL_SILENCE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1

# --------------------------------------------------------------------------- 1. packages
if [[ "$DEVICE" == "cuda" ]]; then
  PY="${PY:-python3}"
  say "install wheels into $SITE/{common,trl116,trl112}"
  for d in common trl116 trl112; do
    timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE/$d" \
      .whl/$d/*.whl || say "pip install $d FAILED"
  done
  COMMON="$SITE/common"; PEERS="$SITE/trl116"; PEERS_PPO="$SITE/trl112"
else
  PY="${PY:-$ROOT/.venv/bin/python}"
  COMMON=""
  PEERS="$(echo "$ROOT"/bench/.venv-peers/lib/python3*/site-packages)"
  PEERS_PPO="$(echo "$ROOT"/bench/.venv-peers-ppo/lib/python3*/site-packages)"
fi
export PYTHONPATH="$ROOT/src${COMMON:+:$COMMON}"
say "versions (posttrain side: PYTHONPATH=$PYTHONPATH)"
VERS='import sys, torch, transformers, accelerate; import datasets; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "datasets", datasets.__version__)'
if ! timeout 60 "$PY" -c "$VERS; import posttrain.recipes.sft"; then
  # transformers 5.24 (the CPU bench's) did not import against this machine's packages: use the machine's own
  say "transformers from .whl failed to import; falling back to the machine's transformers"
  rm -rf "$COMMON"/transformers "$COMMON"/transformers-*.dist-info
  timeout 60 "$PY" -c "$VERS"
fi
timeout 60 env PYTHONPATH="$PEERS:$PYTHONPATH" "$PY" -c "$VERS; import trl; print('trl', trl.__version__)"
timeout 60 env PYTHONPATH="$PEERS_PPO:$PYTHONPATH" "$PY" -c "import trl; from trl.experimental.ppo import PPOTrainer; print('trl', trl.__version__, 'PPOTrainer ok')"
[[ "$DEVICE" == "cuda" ]] && timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv

# --------------------------------------------------------------------------- 2. CUDA smoke of posttrain
SMOKE="$OUT/smoke.md"
printf '# posttrain CUDA smoke (%s)\n\n| stage | result | wall s | command |\n|---|---|---|---|\n' "$DEVICE" > "$SMOKE"
TAILS="$W/smoke-tails.txt"; : > "$TAILS"
# stage NAME SECONDS CMD...: run time-boxed, log to $W/smoke-NAME.log, one row in smoke.md, error tail kept
stage() {
  local name="$1" secs="$2"; shift 2
  local t=$(date +%s) rc
  say "+ [$name] $*"
  timeout -k 5 "$secs" "$@" > "$W/smoke-$name.log" 2>&1; rc=$?
  local d=$(( $(date +%s) - t )) res="pass"
  [[ $rc -eq 124 || $rc -eq 137 ]] && res="**TIMEOUT** (${secs}s)"
  [[ $rc -ne 0 && "$res" == "pass" ]] && res="**FAIL** (exit $rc)"
  echo "| $name | $res | $d | \`$(echo "$*" | sed "s#$W#\$W#g; s#$ROOT/##g" | cut -c1-220)\` |" >> "$SMOKE"
  say "  [$name] $res in ${d}s"
  { echo "=== $name: $res"; tail -n $([[ $res == pass ]] && echo 3 || echo 40) "$W/smoke-$name.log"; } >> "$TAILS"
  return $rc
}
PT=("$PY" -m posttrain)
S="$W/smoke"; rm -rf "$S"; mkdir -p "$S"
COMMON_KEYS=(logging.progress=false resume=false)
stage tiny-model 90 "${PT[@]}" tiny-model "$S/tiny" size=tiny
stage task 90 "${PT[@]}" task arithmetic "$S/task" n_train=256 n_eval=32
D="$S/task"
# independent stages in parallel (correctness only; the bench below runs alone). `wait` is given the pids: a bare
# `wait` (bash >= 5.1) also waits for the `tee` process substitution above, which never ends.
PIDS=()
stage sft 150 "${PT[@]}" sft model="$S/tiny" data.train="$D/sft.jsonl" output_dir="$S/sft" max_steps=6 batch_size=8 \
  packing=true max_length=128 save.steps=3 logging.steps=2 "${COMMON_KEYS[@]}" & PIDS+=($!)
stage sft-lora-gc 150 "${PT[@]}" sft model="$S/tiny" data.train="$D/sft.jsonl" output_dir="$S/sft-lora" max_steps=4 \
  batch_size=8 lora.r=8 gradient_checkpointing=true max_length=128 logging.steps=2 "${COMMON_KEYS[@]}" & PIDS+=($!)
stage rm 150 "${PT[@]}" rm model="$S/tiny" data.train="$D/prefs.jsonl" output_dir="$S/rm" max_steps=6 batch_size=8 \
  max_length=128 logging.steps=2 "${COMMON_KEYS[@]}" & PIDS+=($!)
stage dpo 150 "${PT[@]}" dpo model="$S/tiny" data.train="$D/prefs.jsonl" output_dir="$S/dpo" max_steps=6 batch_size=8 \
  max_length=128 logging.steps=2 "${COMMON_KEYS[@]}" & PIDS+=($!)
stage ppo 150 "${PT[@]}" ppo model="$S/tiny" prompts="$D/prompts.jsonl" reward.task=arithmetic output_dir="$S/ppo" \
  total_episodes=32 rollout.batch_size=16 mini_batch_size=8 batch_size=8 ppo_epochs=1 rollout.max_new_tokens=16 \
  critic_init=policy max_length=128 logging.steps=1 "${COMMON_KEYS[@]}" & PIDS+=($!)
stage fsdp2-save-resume 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 bench/gpu_fsdp_smoke.py \
  "$S/tiny" "$S/fsdp" & PIDS+=($!)
wait "${PIDS[@]}"
# after sft and rm: a copy of sft's run resumed from its step-3 checkpoint to 8 steps, an eval of its final model
cp -r "$S/sft" "$S/sft-r" 2>/dev/null
stage sft-resume 120 "${PT[@]}" sft model="$S/tiny" data.train="$D/sft.jsonl" output_dir="$S/sft-r" max_steps=8 \
  batch_size=8 packing=true max_length=128 save.steps=3 logging.steps=2 logging.progress=false resume=auto & PIDS=($!)
stage eval 120 "${PT[@]}" eval "$S/sft/final" task=arithmetic num_prompts=16 num_samples=2 ref_model="$S/tiny" & PIDS+=($!)
# online DPO scored by the reward model just trained: continuous scores, so pairs (the task verifier ties them all)
stage online-dpo 150 "${PT[@]}" online-dpo model="$S/tiny" prompts="$D/prompts.jsonl" reward.model="$S/rm/final" \
  output_dir="$S/odpo" rounds=1 prompts_per_round=16 samples_per_prompt=2 rollout.max_new_tokens=16 batch_size=8 \
  max_length=128 logging.steps=1 "${COMMON_KEYS[@]}" & PIDS+=($!)
wait "${PIDS[@]}"
grep -q "resumed from .*step-3" "$W/smoke-sft-resume.log" \
  || echo "| sft-resume-check | **FAIL** (no 'resumed from ... step-3' in its log) | 0 | |" >> "$SMOKE"
grep -h "pairs=" "$W/smoke-online-dpo.log" | tail -1 | sed 's/^/online-dpo: /' >> "$TAILS"
{ echo; echo "Error tails (pass: last 3 lines; fail: last 40):"; echo; echo '```'; cat "$TAILS"; echo '```'; } >> "$SMOKE"
say "smoke done: $(grep -c '| pass |' "$SMOKE") passed, $(grep -c '\*\*' "$SMOKE") failed"

# --------------------------------------------------------------------------- 3. GPU benchmark posttrain vs TRL
BW="$W/bench"
if [[ "$DEVICE" == "cuda" ]]; then
  SCALES="${GPU_CHECK_SCALES:-small,base,long}"; EXTRA=(--repeats 2 --threads 8 --timeout 120)
else
  SCALES="${GPU_CHECK_SCALES:-tiny}"; EXTRA=(--quick --threads 1 --timeout 300)
fi
BUDGET=$(( $(left) - 50 ))  # start no case in the last 50 s: a case with its 4 runs takes about that
say "bench: scales $SCALES, budget ${BUDGET}s, hard stop $(( $(left) + 20 ))s"
if (( BUDGET > 30 )); then
  timeout -k 5 $(( $(left) + 20 )) "$PY" bench/run.py --device "$DEVICE" --no-setup --python "$PY" \
    --peer-path "$PEERS" --ppo-peer-path "$PEERS_PPO" --scales "$SCALES" --only "${GPU_CHECK_ONLY:-sft,dpo,ppo,rm}" "${EXTRA[@]}" \
    --budget "$BUDGET" --work "$BW" --out "$OUT/results-gpu.md"
  say "bench exit $?"
else
  say "bench skipped: no time left"
fi
cp "$BW/raw.json" "$OUT/raw-gpu.json" 2>/dev/null
(cd "$W" && tar czf "$OUT/bench-logs.tgz" --exclude='*.safetensors' --exclude='*.pt' --exclude='*.bin' \
  $(ls -d bench/*/*.log bench/*/*.json smoke-*.log 2>/dev/null) 2>/dev/null)
say "done in $(el)s; files: $(ls "$OUT" | tr '\n' ' ')"
exec >&- 2>&-  # let tee see the end of its input and finish log.txt before the machine collects $OUT
wait "$TEE" 2>/dev/null
