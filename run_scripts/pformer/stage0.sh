#!/usr/bin/env bash
# P-Former pre-training (text only) for OPT-2.7B; the paper used 3 GPUs (3 x 128 = 384).
# Extra arguments go to train.py, e.g. --options run.batch_size_train=64 run.accum_grad_iters=2
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-3}
python -m torch.distributed.run --nproc_per_node="$NPROC" train.py \
  --cfg-path projects/pformer/stage0.yaml "$@"
