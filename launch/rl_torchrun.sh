#!/usr/bin/env bash
# The RL recipe (`megatron-seed rl`: value pretraining, then PPO with held-out evaluation)
# on one node with torchrun; every process holds a shard of the actor, the critic and
# the rollout engine (colocated on the same groups).
#
#   launch/rl_torchrun.sh                                        # configs/rl-tiny.yaml on all local GPUs (or 1 CPU process)
#   NPROC_PER_NODE=2 launch/rl_torchrun.sh --set parallel.tp=2   # 2 CPU processes, tensor parallel (gloo)
#   NPROC_PER_NODE=8 launch/rl_torchrun.sh --preset small --set parallel.tp=2 --set parallel.ep=4
#   launch/rl_torchrun.sh --resume                               # continue from train.save_dir after a stop or crash
#
# Arguments after the script name go to `megatron-seed rl` (--preset / --config / --set /
# --prompts / --resume). rl.prompts_per_step must be a multiple of dp (what remains of
# NPROC_PER_NODE after tp * cp * pp). Ctrl-C saves a checkpoint and stops every rank.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NNODES=1 NODE_RANK=0 exec "$ROOT/launch/torchrun.sh" rl "$@"
