#!/usr/bin/env bash
# The VL-Vicuna web demo on http://127.0.0.1:7860 (this machine only; --host to change).
#   run_scripts/vicuna/web_demo.sh VICUNA_DIR CHECKPOINT [--port 7860] [--max-image-mb 10] [...]
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 2 ]; then
  echo "usage: $0 VICUNA_DIR CHECKPOINT [options]" >&2
  exit 2
fi
VICUNA=$1 CKPT=$2
shift 2
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m lavis_vpgtrans.chat.web --model-type vl_vicuna7b --llm-model "$VICUNA" \
  --checkpoint "$CKPT" "$@"
