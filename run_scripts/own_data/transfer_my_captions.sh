#!/usr/bin/env bash
# README "Your own data" 1: transfer a BLIP-2 VPG to your LLM on your captions.
#   MY_DATA=DATA_DIR TGT_LLM=facebook/opt-6.7b NPROC=8 bash run_scripts/own_data/transfer_my_captions.sh
#   VPGTRANS_MINIATURE=1 bash run_scripts/own_data/transfer_my_captions.sh   # the same on the toy zoo (CPU)
# 1. the word-embedding converter: SRC_LLM's projector (in SOURCE_CKPT) mapped to TGT_LLM's input
#    embeddings -> output/own_data/converter.pth
# 2. projects/own_data/transfer_captions.yaml: stage 1 (projector warm-up) + stage 2 (VPG + projector)
#    on MY_DATA's train.jsonl, validated on its val.json -> output/own_data/transfer/train/
# 3. evaluate.py on the best checkpoint: your val split's BLEU / METEOR / ROUGE-L / CIDEr
# Environment: MY_DATA (caption_json.yaml's layout), SRC_LLM / SOURCE_CKPT (the source BLIP-2: default
# BLIP-2 OPT-2.7B), TGT_LLM (HF id or dir), TGT_ARCH (default blip2_opt_transfer), NPROC (default 8).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
MINIATURE_PAPER_DATA=0 source run_scripts/vpgtrans/_miniature.sh
SRC_LLM=${SRC_LLM:-facebook/opt-2.7b}
SOURCE_CKPT=${SOURCE_CKPT:-https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained_opt2.7b.pth}
TGT_ARCH=${TGT_ARCH:-blip2_opt_transfer}
CFG=projects/own_data/transfer_captions.yaml
if [ "$MINIATURE" = 1 ]; then
  MY_DATA=${MY_DATA:-$PWD/output/own_data/miniature}
  $PY run_scripts/vpgtrans/miniature.py own-data "$MY_DATA"
  MY_DATA=$MY_DATA/captions SRC_LLM=$ZOO/opt-small TGT_LLM=$ZOO/opt-large
  SOURCE_CKPT=output/own_data/miniature_source.pth
  $PY run_scripts/vpgtrans/miniature.py source blip2_opt_transfer tiny_opt_small "$SOURCE_CKPT"
fi
: "${MY_DATA:?set MY_DATA to your data directory}" "${TGT_LLM:?set TGT_LLM to your target LLM}"
NPROC=${NPROC:-8}

$PY -m lavis_vpgtrans.transfer.converter --src "$SRC_LLM" --tgt "$TGT_LLM" --projector "$SOURCE_CKPT" \
  --src-arch blip2_opt --tgt-arch "$TGT_ARCH" --out output/own_data/converter.pth
train "$CFG" model.llm_model="$TGT_LLM" model.vpg_checkpoint="$SOURCE_CKPT" datasets.own_caption.data_root="$MY_DATA"
evaluate "$CFG" output/own_data/transfer/train/checkpoint_best.pth model.llm_model="$TGT_LLM" \
  datasets.own_caption.data_root="$MY_DATA" run.job_id=eval
