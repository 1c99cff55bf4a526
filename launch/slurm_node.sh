#!/usr/bin/env bash
# What each SLURM node runs (one task per node, started by srun from launch/slurm.sbatch): its own
# DeepSpeed launcher in per-node mode (--no_ssh), so no pdsh/ssh set-up is needed and every rank
# inherits this task's environment.
#
#   launch/slurm_node.sh CONFIG [plait train flags...]
#
# Reads SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_NODEID (and SLURM_JOB_ID for file names);
# GPUS_PER_NODE (default: the GPUs nvidia-smi lists, else 1) sets the processes per node.
# SIGUSR1/SIGTERM are passed to the training processes, which checkpoint and exit with code 75.
set -euo pipefail

config=${1:?usage: slurm_node.sh CONFIG [args]}
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${SLURM_JOB_NODELIST:?run under SLURM (or set SLURM_JOB_NODELIST)}"
: "${SLURM_NNODES:?}" "${SLURM_NODEID:?}"

if command -v scontrol >/dev/null 2>&1; then
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
  IFS=, read -r -a hosts <<< "$SLURM_JOB_NODELIST"
fi
if [[ -z ${GPUS_PER_NODE:-} ]]; then
  GPUS_PER_NODE=$(command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L | wc -l || echo 1)
fi
hostfile=${PLAIT_HOSTFILE:-hostfile.${SLURM_JOB_ID:-local}.node${SLURM_NODEID}}
: > "$hostfile"
for host in "${hosts[@]}"; do
  printf '%s slots=%s\n' "$host" "$GPUS_PER_NODE" >> "$hostfile"
done

# The launcher itself would die on SIGUSR1: hand the signal to the ranks (their command line is
# `python -u .../train.py --local_rank=N ...`) and wait for them to checkpoint and exit. Only this
# launcher's descendants are signalled: another job's ranks on a shared node are left alone.
# shellcheck disable=SC2329  # invoked by forward
descendants() {
  local child
  for child in $(pgrep -P "$1"); do
    echo "$child"
    descendants "$child"
  done
}
# shellcheck disable=SC2329  # invoked by the trap below
forward() {
  local tree rank
  tree=" $(descendants "$launcher" | tr '\n' ' ') "
  for rank in $(pgrep -f -- "$here/train.py --local_rank="); do
    if [[ $tree == *" $rank "* ]]; then kill -USR1 "$rank" 2>/dev/null || true; fi
  done
}
trap forward USR1 TERM

deepspeed --hostfile "$hostfile" --no_ssh --num_nodes "$SLURM_NNODES" --num_gpus "$GPUS_PER_NODE" \
  --node_rank "$SLURM_NODEID" --master_addr "${MASTER_ADDR:-${hosts[0]}}" --master_port "${MASTER_PORT:-29500}" \
  "$here/train.py" "$config" "$@" &
launcher=$!
# `wait` returns early (status > 128) when a trapped signal arrives: wait again while the launcher
# runs, then take its exit status (bash keeps it), which a signal arriving as it exits cannot replace.
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher" || true
done
status=0
wait "$launcher" || status=$?
exit "$status"
