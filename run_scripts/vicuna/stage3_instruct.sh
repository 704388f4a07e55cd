#!/usr/bin/env bash
# VL-Vicuna stage 3 (visual instruction tuning on MiniGPT-4's self-instruct data) from a
# stage-2 checkpoint of the OPT-6.7B -> Vicuna-7B transfer.
#   run_scripts/vicuna/stage3_instruct.sh STAGE2_CHECKPOINT VICUNA_DIR DATA_ROOT [KEY=VALUE ...]
# The KEY=VALUEs join this script's own --options (a second --options would replace them).
# DATA_ROOT holds cc_sbu_align/{filter_cap.json,image/}. NPROC (default 8) processes.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ $# -lt 3 ]; then
  echo "usage: $0 STAGE2_CHECKPOINT VICUNA_DIR DATA_ROOT [KEY=VALUE ...  more train.py options, e.g. run.max_epoch=1]" >&2
  exit 2
fi
CKPT=$1 VICUNA=$2 DATA=$3
shift 3
for arg in "$@"; do
  if [ "$arg" = --options ]; then
    echo "$0: pass the extra options as KEY=VALUE without --options (a second --options would replace the script's own)" >&2
    exit 2
  fi
done
NPROC=${NPROC:-8}
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" train.py \
  --cfg-path projects/vpgtrans/stage3_vicuna_instruct.yaml \
  --options model.finetuned="$CKPT" model.llm_model="$VICUNA" run.data_root="$DATA" "$@"
