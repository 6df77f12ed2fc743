#!/usr/bin/env bash
# Install the peers that bench/run.py measures posttrain against, each in its own
# virtual environment under bench/ (ignored by git). Never touches the project's .venv.
#
#   bench/.venv-peers      TRL's current release: SFTTrainer, RewardTrainer, DPOTrainer
#   bench/.venv-peers-ppo  the last TRL release that still ships PPOTrainer
#
# Why two: the PPO trainer was removed after TRL 1.12.0 (1.12.0 has it as
# `trl.experimental.ppo.PPOTrainer`; 1.13.0 and later do not ship trl/experimental/ppo),
# and one environment can hold only one TRL.
#
# transformers, accelerate and datasets are pinned to the project's own versions so both
# sides run the same model code (the Llama forward is then identical and only the trainer
# differs). Re-running is cheap: an environment whose stamp matches is left as it is.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PY:-python3}"

TORCH_VERSION="2.13.0"        # the CPU build; a bare `torch` would pull a multi-GB CUDA build
TRL_CURRENT="1.16.0"          # TRL's current release (SFT, reward, DPO)
TRL_PPO="1.12.0"              # last release with PPOTrainer (trl.experimental.ppo)
TRANSFORMERS_VERSION="5.24.0"
ACCELERATE_VERSION="1.15.0"
DATASETS_VERSION="5.2.0"

make_env() {
  local dir="$1" trl="$2"
  local stamp="$dir/.bench-installed"
  local want="torch=$TORCH_VERSION trl=$trl transformers=$TRANSFORMERS_VERSION accelerate=$ACCELERATE_VERSION datasets=$DATASETS_VERSION"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup_peers: $dir is up to date ($want)"
    return
  fi
  echo "setup_peers: creating $dir ($want)"
  test -x "$dir/bin/python" || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned, exactly as the Makefile installs the project's own (the CPU build
  # where there is no GPU), so that trl's dependency on torch is already satisfied.
  "$dir/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  "$dir/bin/python" -m pip install -q \
    "trl==$trl" \
    "transformers==$TRANSFORMERS_VERSION" \
    "accelerate==$ACCELERATE_VERSION" \
    "datasets==$DATASETS_VERSION" \
    psutil tokenizers
  "$dir/bin/python" -c "import torch, trl, transformers; print('setup_peers:', '$dir', 'torch', torch.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__)"
  echo "$want" > "$stamp"
}

make_env "$HERE/.venv-peers" "$TRL_CURRENT"
make_env "$HERE/.venv-peers-ppo" "$TRL_PPO"
TRL_EXPERIMENTAL_SILENCE=1 "$HERE/.venv-peers-ppo/bin/python" -c "from trl.experimental.ppo import PPOTrainer, PPOConfig; print('setup_peers: PPOTrainer from trl.experimental.ppo')"
