#!/usr/bin/env bash
# The VPGTrans scale-up pipeline for one transfer, used by the per-transfer scripts here:
#   1. word-embedding converter -> initial target projector
#   2. stage 1: projector warm-up (torchrun)
#   3. stage 2: joint fine-tuning from the stage-1 checkpoint (torchrun)
# Environment: DATA (data root), NPROC (GPUs, default 8), SRC_LLM / TGT_LLM (HF dirs or ids),
# SOURCE_CKPT (the source BLIP-2 checkpoint, path or URL), extra train.py --options in OPTIONS.
set -euo pipefail
: "${NAME:?}" "${SRC_ARCH:?}" "${TGT_ARCH:?}" "${SRC_LLM:?}" "${TGT_LLM:?}" "${SOURCE_CKPT:?}" "${DATA:?set DATA to your data root}"
NPROC=${NPROC:-8}
PY=${PYTHON:-python}
OUT=output/vpgtrans
CONVERTED=$OUT/converter/$NAME.pth

$PY -m lavis_vpgtrans.transfer.converter --src "$SRC_LLM" --tgt "$TGT_LLM" --projector "$SOURCE_CKPT" \
  --src-arch "$SRC_ARCH" --tgt-arch "$TGT_ARCH" --out "$CONVERTED"

# stage 1 reads the converter's output and writes <output_dir>/stage1/checkpoint_0.pth, which
# stage 2 reads (the paths in the configs); both inherit the VPG of SOURCE_CKPT
$PY -m torch.distributed.run --nproc_per_node="$NPROC" train.py --cfg-path "$STAGE1_CFG" \
  --options run.data_root="$DATA" model.llm_model="$TGT_LLM" model.vpg_checkpoint="$SOURCE_CKPT" ${OPTIONS:-}
$PY -m torch.distributed.run --nproc_per_node="$NPROC" train.py --cfg-path "$STAGE2_CFG" \
  --options run.data_root="$DATA" model.llm_model="$TGT_LLM" model.vpg_checkpoint="$SOURCE_CKPT" ${OPTIONS:-}
