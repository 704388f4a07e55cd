#!/usr/bin/env bash
# The paper's exploration comparison (Table 3 / Fig. 7) for ViT-L OPT-125M -> OPT-1.3B:
# source model, converter, VPGTrans and the baselines, then the speed-up table and plots.
#   DATA=/data NPROC=8 bash run_scripts/vpgtrans/explore.sh
#   VPGTRANS_MINIATURE=1 bash run_scripts/vpgtrans/explore.sh    # the same on the toy zoo, CPU, ~2 min
# Every run goes where its config says (output/vpgtrans/explore/<job_id>/); a second launch
# into an existing run directory is refused: remove output/vpgtrans/explore (and the converter's
# output/vpgtrans/converter/opt125m_to_opt1.3b.pth) to start over.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
source run_scripts/vpgtrans/_miniature.sh
: "${DATA:?set DATA to your data root}"
NPROC=${NPROC:-8}
EXPLORE=output/vpgtrans/explore
SRC_LLM=facebook/opt-125m TGT_LLM=facebook/opt-1.3b
if [ "$MINIATURE" = 1 ]; then SRC_LLM=$ZOO/opt-small TGT_LLM=$ZOO/opt-large; fi

# the source: BLIP-2 ViT-L OPT-125M, trained from scratch
train projects/vpgtrans/baselines/tfs.yaml run.data_root="$DATA" model.model_type=vitL_opt125m \
  run.job_id=source_opt125m
$PY -m lavis_vpgtrans.transfer.converter --src "$SRC_LLM" --tgt "$TGT_LLM" \
  --projector $EXPLORE/source_opt125m/checkpoint_best.pth --src-arch blip2_opt_transfer --tgt-arch blip2_opt_transfer \
  --out output/vpgtrans/converter/opt125m_to_opt1.3b.pth
# TFS (its VPG: BLIP-2's stage-1 Q-Former), then VPGTrans and the baselines from the source's VPG
for cfg in baselines/tfs vpgtrans baselines/vpg_inherit baselines/only_linear baselines/vpgtrans_no_converter; do
  train projects/vpgtrans/$cfg.yaml run.data_root="$DATA"
done
$PY -m lavis_vpgtrans.analysis.speedup --tfs $EXPLORE/tfs --vpgtrans $EXPLORE/vpgtrans \
  --inherit $EXPLORE/vpg_inherit --run only_linear=$EXPLORE/only_linear \
  --run no_converter=$EXPLORE/vpgtrans_no_converter --out $EXPLORE/analysis
