#!/usr/bin/env bash
# The VPGTrans scale-up pipeline for one transfer, used by the per-transfer scripts here:
#   1. word-embedding converter -> initial target projector (output/vpgtrans/converter/$NAME.pth)
#   2. stage 1: projector warm-up (torchrun) -> <output_dir>/stage1/checkpoint_0.pth
#   3. stage 2: joint fine-tuning from the stage-1 checkpoint (torchrun) -> <output_dir>/stage2/
# Stage 1 and 2 read those paths as their configs write them, and inherit the VPG of SOURCE_CKPT.
# Environment: DATA (data root), NPROC (GPUs, default 8), SRC_LLM / TGT_LLM (HF dirs or ids),
# SOURCE_CKPT (the source BLIP-2 checkpoint, path or URL), extra train.py options in OPTIONS.
# VPGTRANS_MINIATURE=1: the same on the toy zoo (_miniature.sh): the per-transfer script's
# MINI_SRC_LLM / MINI_TGT_LLM (zoo entries) stand in for the LLMs, and an untrained toy model of
# MINI_SOURCE ("ARCH MODEL_TYPE") for a SOURCE_CKPT that is a URL.
set -euo pipefail
PY=${PYTHON:-python}
source run_scripts/vpgtrans/_miniature.sh
: "${NAME:?}" "${SRC_ARCH:?}" "${TGT_ARCH:?}" "${SRC_LLM:?}" "${TGT_LLM:?}" "${SOURCE_CKPT:?}" "${DATA:?set DATA to your data root}"
NPROC=${NPROC:-8}
OUT=output/vpgtrans
CONVERTED=$OUT/converter/$NAME.pth
if [ "$MINIATURE" = 1 ]; then
  SRC_LLM=$ZOO/${MINI_SRC_LLM:?} TGT_LLM=$ZOO/${MINI_TGT_LLM:?}
  if [[ "$SOURCE_CKPT" == *://* ]]; then
    SOURCE_CKPT=$OUT/miniature/source_$NAME.pth
    $PY run_scripts/vpgtrans/miniature.py source ${MINI_SOURCE:?} "$SOURCE_CKPT"
  fi
fi

$PY -m lavis_vpgtrans.transfer.converter --src "$SRC_LLM" --tgt "$TGT_LLM" --projector "$SOURCE_CKPT" \
  --src-arch "$SRC_ARCH" --tgt-arch "$TGT_ARCH" --out "$CONVERTED"
for cfg in "$STAGE1_CFG" "$STAGE2_CFG"; do
  # shellcheck disable=SC2086  # OPTIONS: several options, split on spaces
  train "$cfg" run.data_root="$DATA" model.llm_model="$TGT_LLM" model.vpg_checkpoint="$SOURCE_CKPT" ${OPTIONS:-}
done
