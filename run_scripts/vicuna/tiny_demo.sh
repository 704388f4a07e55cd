#!/usr/bin/env bash
# Offline, on CPU: stage 3 of the tiny VL-Vicuna on the toy instruction set, then one scripted
# chat turn with the result about a toy image.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-output/demo/tiny_vicuna_instruct}
JOB=$(date +%Y%m%d%H%M%S)  # a new run directory per launch: a run refuses one holding an earlier run
"$PYTHON" train.py --cfg-path projects/vpgtrans/demo/tiny_vicuna_instruct.yaml \
  --options run.output_dir="$OUT" run.job_id="$JOB" "$@"
IMAGE=$("$PYTHON" -c "from lavis_vpgtrans.toy import zoo; print(zoo.resolve('toy:instruct/image/1.jpg'))")
printf 'Describe this image in detail.\n' | "$PYTHON" -m lavis_vpgtrans.chat --model-type tiny_vl_vicuna \
  --checkpoint "$OUT/$JOB/checkpoint_2.pth" --image "$IMAGE" --device cpu --max-new-tokens 48
