#!/usr/bin/env bash
# Offline P-Former pipeline on the toy zoo, on CPU: stage 0 (P-Former), stage 1 (Q-Former with
# alignment), stage 2 (tiny OPT VL-LLM with alignment), each reading the previous outputs
# under output/pformer/demo/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
# each stage's config names its run directory (the next stage reads it there) and a run refuses
# a directory holding an earlier run: a demo launch starts over
rm -rf output/pformer/demo
for stage in 0 1 2; do
  "$PYTHON" train.py --cfg-path "projects/pformer/demo/tiny_stage${stage}.yaml" "$@"
done
