#!/usr/bin/env bash
# Training under torchrun, for those who prefer it (run on every node).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh CONFIG [plait train flags...]
set -euo pipefail

config=${1:?usage: torchrun.sh CONFIG [args]}
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 1)
fi
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  "$here/train.py" "$config" "$@"
