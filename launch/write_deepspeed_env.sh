#!/usr/bin/env bash
# Write the environment every node must see into a .deepspeed_env file (the DeepSpeed launcher
# exports each NAME=value line on every node it starts). Usage: write_deepspeed_env.sh OUT_FILE
#
# Forwarded: variables whose names start with a prefix in PLAIT_ENV_PREFIXES (default below),
# plus the exact names in PLAIT_ENV_NAMES. Values with newlines cannot be expressed and are skipped.
set -euo pipefail

out=${1:?usage: write_deepspeed_env.sh OUT_FILE}
prefixes=${PLAIT_ENV_PREFIXES:-"NCCL_ MLFLOW_ HF_ TORCH_ CUDA_ OMP_ DS_ PLAIT_ WANDB_ TRANSFORMERS_"}
names=${PLAIT_ENV_NAMES:-"PYTHONPATH LD_LIBRARY_PATH PATH MASTER_PORT"}

# The file can carry secrets (HF_TOKEN, MLFLOW_TRACKING_PASSWORD): only its owner may read it.
tmp="$out.tmp.$$"
(umask 077 && : > "$tmp")
while IFS= read -r -d '' entry; do
  name=${entry%%=*}
  value=${entry#*=}
  case "$value" in *$'\n'*) continue ;; esac
  keep=0
  for p in $prefixes; do [[ $name == "$p"* ]] && keep=1; done
  for n in $names; do [[ $name == "$n" ]] && keep=1; done
  if (( keep )) && [[ -n $name && $name != PLAIT_ENV_* ]]; then
    printf '%s=%s\n' "$name" "$value" >> "$tmp"
  fi
done < <(env -0 | sort -z)
mv "$tmp" "$out"
