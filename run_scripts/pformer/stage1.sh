#!/usr/bin/env bash
# BLIP-2 stage 1 + P-Former alignment (omega_1 = 10); the paper used 8 GPUs (8 x 128 = 1024). Needs stage0.sh's checkpoint.
# Extra arguments go to train.py, e.g. --options run.batch_size_train=64 run.accum_grad_iters=2
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-8}
python -m torch.distributed.run --nproc_per_node="$NPROC" train.py \
  --cfg-path projects/pformer/stage1.yaml "$@"
