#!/usr/bin/env bash
# Start moe_dist pretraining on a multi-node cluster with the deepspeed launcher.
#
# Three ways (arguments after the script go to launch/pretrain.py):
#  1. SLURM, one task per node (no ssh needed):
#       srun --nodes=8 --ntasks-per-node=1 launch/multinode.sh --config configs/gpu_1b_active_e64.yaml
#     The hostfile is built from SLURM_JOB_NODELIST, NODE_RANK is SLURM_NODEID, the master is the
#     first node.
#  2. Any scheduler, run the same command on every node (no ssh needed):
#       HOSTFILE=hosts NODE_RANK=<k> MASTER_ADDR=<node 0 address> launch/multinode.sh --config ...
#  3. From node 0 only, with passwordless ssh and pdsh installed (the launcher starts the others):
#       PDSH=1 HOSTFILE=launch/hostfile.example MASTER_ADDR=<node 0 address> launch/multinode.sh --config ...
#
# Environment: GPUS_PER_NODE (8), MASTER_PORT (29500). The repository, its virtualenv, the data and
# train.checkpoint_dir must be at the same paths on every node (checkpoint_dir on a shared filesystem).
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ -n "${SLURM_JOB_NODELIST:-}" && -z "${HOSTFILE:-}" ]]; then
  # Same content on every node: built from the job's node list.
  HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/moe_dist_hostfile.XXXXXX")
  scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v slots="$GPUS_PER_NODE" '{print $1" slots="slots}' > "$HOSTFILE"
  NODE_RANK=${NODE_RANK:-$SLURM_NODEID}
  MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | cut -d' ' -f1)}
fi

: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (see launch/hostfile.example)}"
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address (the launcher would otherwise ssh to find it)}"

if [[ -n "${PDSH:-}" ]]; then
  exec deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    launch/pretrain.py "$@"
fi

: "${NODE_RANK:?set NODE_RANK to this node's line number in the hostfile, from 0}"
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" launch/pretrain.py "$@"
