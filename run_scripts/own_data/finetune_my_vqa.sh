#!/usr/bin/env bash
# README "Your own data" 2: fine-tune on your VQA data and score your split with the official VQA accuracy.
#   MY_DATA=DATA_DIR NPROC=8 bash run_scripts/own_data/finetune_my_vqa.sh
#   VPGTRANS_MINIATURE=1 bash run_scripts/own_data/finetune_my_vqa.sh   # the same on the toy zoo (CPU)
# projects/own_data/vqa_json.yaml (BLIP-2 OPT-2.7B; MY_DATA: train.jsonl, val.json, images/) -> output/own_data/vqa/train/,
# then evaluate.py on the best checkpoint -> output/own_data/vqa/eval/. Extra train.py / evaluate.py
# options (e.g. a transferred model: model.model_type=opt6.7b model.finetuned=CKPT) in OPTIONS.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
MINIATURE_PAPER_DATA=0 source run_scripts/vpgtrans/_miniature.sh
CFG=projects/own_data/vqa_json.yaml
if [ "$MINIATURE" = 1 ]; then
  MY_DATA=${MY_DATA:-$PWD/output/own_data/miniature}
  $PY run_scripts/vpgtrans/miniature.py own-data "$MY_DATA"
  MY_DATA=$MY_DATA/vqa
fi
: "${MY_DATA:?set MY_DATA to your data directory}"
NPROC=${NPROC:-8}

# shellcheck disable=SC2086  # OPTIONS: several options, split on spaces
train "$CFG" datasets.own_vqa.data_root="$MY_DATA" ${OPTIONS:-}
# shellcheck disable=SC2086
evaluate "$CFG" output/own_data/vqa/train/checkpoint_best.pth datasets.own_vqa.data_root="$MY_DATA" run.job_id=eval ${OPTIONS:-}
