#!/usr/bin/env bash
# The paper's exploration comparison (Table 3 / Fig. 7) for ViT-L OPT-125M -> OPT-1.3B:
# source model, converter, VPGTrans and the baselines, then the speed-up table and plots.
#   DATA=/data NPROC=8 bash run_scripts/vpgtrans/explore.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATA:?set DATA to your data root}"
NPROC=${NPROC:-8}
PY=${PYTHON:-python}
train() { $PY -m torch.distributed.run --nproc_per_node="$NPROC" train.py --cfg-path "$1" \
  --options run.data_root="$DATA" run.job_id=run "${@:2}"; }

# the source: BLIP-2 ViT-L OPT-125M, trained from scratch
train projects/vpgtrans/baselines/tfs.yaml model.model_type=vitL_opt125m \
  run.output_dir=output/vpgtrans/explore/source_opt125m
SOURCE=output/vpgtrans/explore/source_opt125m/run/checkpoint_best.pth
$PY -m lavis_vpgtrans.transfer.converter --src facebook/opt-125m --tgt facebook/opt-1.3b \
  --projector "$SOURCE" --src-arch blip2_opt_transfer --tgt-arch blip2_opt_transfer \
  --out output/vpgtrans/converter/opt125m_to_opt1.3b.pth
train projects/vpgtrans/baselines/tfs.yaml   # its VPG: BLIP-2's stage-1 Q-Former
for cfg in vpgtrans baselines/vpg_inherit baselines/only_linear baselines/vpgtrans_no_converter; do
  train projects/vpgtrans/$cfg.yaml model.vpg_checkpoint="$SOURCE"
done
$PY -m lavis_vpgtrans.analysis.speedup --tfs output/vpgtrans/explore/tfs --vpgtrans output/vpgtrans/explore/vpgtrans \
  --inherit output/vpgtrans/explore/vpg_inherit --run only_linear=output/vpgtrans/explore/only_linear \
  --run no_converter=output/vpgtrans/explore/vpgtrans_no_converter --out output/vpgtrans/explore/analysis
