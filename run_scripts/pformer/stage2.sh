#!/usr/bin/env bash
# BLIP-2 stage 2 + P-Former alignment (omega_2 = 100); 8 GPUs (8 x 128 = 1024). Needs stage0.sh's and stage1.sh's checkpoints.
# Extra arguments go to train.py, e.g. --options run.batch_size_train=64 run.accum_grad_iters=2
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-8}
python -m torch.distributed.run --nproc_per_node="$NPROC" train.py \
  --cfg-path projects/pformer/stage2.yaml "$@"
