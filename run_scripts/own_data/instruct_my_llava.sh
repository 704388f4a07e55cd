#!/usr/bin/env bash
# README "Your own data" 3: instruction-tune VL-Vicuna on your LLaVA-format file, then chat with it.
#   MY_DATA=DATA_DIR VICUNA=VICUNA_V0_DIR STAGE2_CKPT=CKPT IMAGE=FILE NPROC=8 bash run_scripts/own_data/instruct_my_llava.sh
#   VPGTRANS_MINIATURE=1 bash run_scripts/own_data/instruct_my_llava.sh   # the same on the toy zoo (CPU)
# projects/own_data/instruct_llava.yaml from STAGE2_CKPT (a stage-2 checkpoint of a transfer to
# Vicuna-7B, or the released vl-vicuna.pth) -> output/own_data/instruct/train/, then one chat turn
# about IMAGE (QUESTION) with the last checkpoint; for a conversation run the chat command yourself.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
MINIATURE_PAPER_DATA=0 source run_scripts/vpgtrans/_miniature.sh
CFG=projects/own_data/instruct_llava.yaml
MODEL_TYPE=vl_vicuna7b CHAT_OPTIONS=()
if [ "$MINIATURE" = 1 ]; then
  MY_DATA=${MY_DATA:-$PWD/output/own_data/miniature}
  $PY run_scripts/vpgtrans/miniature.py own-data "$MY_DATA"
  MY_DATA=$MY_DATA/instruct VICUNA=$ZOO/llama MODEL_TYPE=tiny_vl_vicuna
  IMAGE=${IMAGE:-$MY_DATA/images/$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['image'])" "$MY_DATA/llava_instruct.json")}
  STAGE2_CKPT=output/own_data/miniature_stage2.pth
  $PY run_scripts/vpgtrans/miniature.py source blip2_vicuna tiny_vicuna "$STAGE2_CKPT"
  CHAT_OPTIONS=(--device cpu --max-new-tokens 16)
fi
: "${MY_DATA:?set MY_DATA to your data directory}" "${VICUNA:?set VICUNA to your Vicuna-7B (v0) directory}"
: "${STAGE2_CKPT:?set STAGE2_CKPT}" "${IMAGE:?set IMAGE to an image to chat about}"
NPROC=${NPROC:-8}
QUESTION=${QUESTION:-Describe the image.}

train "$CFG" model.llm_model="$VICUNA" model.finetuned="$STAGE2_CKPT" datasets.own_instruct.data_root="$MY_DATA"
LAST=$(ls output/own_data/instruct/train/checkpoint_*.pth | sort -V | tail -n 1)
printf '%s\n' "$QUESTION" | $PY -m lavis_vpgtrans.chat --model-type "$MODEL_TYPE" --llm-model "$VICUNA" \
  --checkpoint "$LAST" --image "$IMAGE" "${CHAT_OPTIONS[@]}"
