#!/usr/bin/env bash
# The demo command: builds .venv/ if needed, then runs the offline CPU demo.
# For now: the tiny VL-LLM trained one epoch on toy-world captions under LAVIS's loop, then
# its checkpoint re-evaluated with evaluate.py (a later release makes this the full VPGTrans
# speed-up experiment).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-output/demo}
CFG=projects/vpgtrans/demo/tiny_caption_opt.yaml
JOB=$(date +%Y%m%d%H%M%S)
.venv/bin/python train.py --cfg-path "$CFG" --options run.output_dir="$OUT" run.job_id="$JOB"
.venv/bin/python evaluate.py --cfg-path "$CFG" --ckpt "$OUT/$JOB/checkpoint_best.pth" \
  --options run.output_dir="$OUT" run.job_id="$JOB-eval"
echo "[demo] training log: $OUT/$JOB/log.txt   evaluation: $OUT/$JOB-eval/evaluate.txt"
