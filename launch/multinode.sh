#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher.
#
#   launch/multinode.sh HOSTFILE CONFIG [plait train flags...]
#
# From the first node (the launcher reaches the others over pdsh/ssh), or on every node at once
# with NODE_RANK set (per-node mode, no ssh: each node runs its own launcher with --no_ssh).
# MASTER_ADDR defaults to the first host of HOSTFILE, MASTER_PORT to 29500. In ssh mode the
# environment listed in launch/write_deepspeed_env.sh (NCCL_*, MLFLOW_*, HF_*, PYTHONPATH, ...) is
# written to ./.deepspeed_env so it reaches every node; in per-node mode each node's own
# environment is used as it is.
set -euo pipefail

hostfile=${1:?usage: multinode.sh HOSTFILE CONFIG [args]}
config=${2:?usage: multinode.sh HOSTFILE CONFIG [args]}
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

first_host=$(grep -v '^[[:space:]]*\(#\|$\)' "$hostfile" | head -n 1 | awk '{print $1}')
master_addr=${MASTER_ADDR:-$first_host}
master_port=${MASTER_PORT:-29500}
num_nodes=$(grep -cv '^[[:space:]]*\(#\|$\)' "$hostfile")

args=(--hostfile "$hostfile" --num_nodes "$num_nodes" --master_addr "$master_addr" --master_port "$master_port")
if [[ -n ${NUM_GPUS:-} ]]; then
  args+=(--num_gpus "$NUM_GPUS")
fi
if [[ -n ${NODE_RANK:-} ]]; then
  args+=(--no_ssh --node_rank "$NODE_RANK")
else
  "$here/write_deepspeed_env.sh" .deepspeed_env
fi
exec deepspeed "${args[@]}" "$here/train.py" "$config" "$@"
