#!/usr/bin/env bash
# Launch any megatron-seed command on one node or several with torchrun.
#
#   launch/torchrun.sh train --preset tiny --set parallel.tp=2
#   NPROC_PER_NODE=8 NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh train --preset small
#
# Environment (all optional):
#   NPROC_PER_NODE  processes on this node (default: the GPU count, or 1 without GPUs)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node's index, 0 .. NNODES-1 (default 0)
#   MASTER_ADDR     host of node 0 (default 127.0.0.1)
#   MASTER_PORT     a free TCP port on node 0 (default 29500)
#   PYTHON          interpreter with megatron-seed installed (default: .venv/bin/python if present, else python3)
#
# Each process reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun; the backend is NCCL
# on GPUs and gloo on CPU (parallel.backend=auto). The layout (tp, pp, ep, ...) comes
# from the config; dp is what remains of NNODES * NPROC_PER_NODE.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ $# -eq 0 ]]; then
  echo "usage: $0 COMMAND [ARGS...]   e.g. $0 train --preset tiny --set parallel.tp=2" >&2
  exit 2
fi
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)')"
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"

cd "$ROOT"
exec "$PYTHON" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" \
  --master-port "$MASTER_PORT" \
  -m megatron_seed.cli "$@"
