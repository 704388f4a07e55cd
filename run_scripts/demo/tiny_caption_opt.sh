#!/usr/bin/env bash
# Offline smoke run of LAVIS's loop with the plugin: 2 CPU processes (gloo), one epoch of the
# tiny OPT VL-LLM on toy-world captions, then caption evaluation.
set -euo pipefail
cd "$(dirname "$0")/../.."
NPROC=${NPROC:-2}
.venv/bin/python -m torch.distributed.run --nproc_per_node="$NPROC" train.py \
  --cfg-path projects/vpgtrans/demo/tiny_caption_opt.yaml "$@"
