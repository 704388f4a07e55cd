#!/usr/bin/env bash
# Talk to VL-Vicuna about an image in the terminal.
#   run_scripts/vicuna/chat.sh VICUNA_DIR CHECKPOINT IMAGE [more options of python -m lavis_vpgtrans.chat]
# CHECKPOINT: the released vl-vicuna.pth or a stage-3 checkpoint (trainable parameters only).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 3 ]; then
  echo "usage: $0 VICUNA_DIR CHECKPOINT IMAGE [options]" >&2
  exit 2
fi
VICUNA=$1 CKPT=$2 IMAGE=$3
shift 3
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m lavis_vpgtrans.chat --model-type vl_vicuna7b --llm-model "$VICUNA" \
  --checkpoint "$CKPT" --image "$IMAGE" "$@"
