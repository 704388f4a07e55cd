#!/usr/bin/env bash
# VPGTrans flant5xl_to_flant5xxl: converter, stage 1 and stage 2 (see _transfer.sh for the environment).
#   DATA=/data NPROC=8 bash run_scripts/vpgtrans/flant5xl_to_flant5xxl.sh
#   VPGTRANS_MINIATURE=1 bash run_scripts/vpgtrans/flant5xl_to_flant5xxl.sh   # in miniature on the toy zoo (CPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
export NAME=flant5xl_to_flant5xxl SRC_ARCH=blip2_t5 TGT_ARCH=blip2_t5_transfer
export SRC_LLM=${SRC_LLM:-google/flan-t5-xl} TGT_LLM=${TGT_LLM:-google/flan-t5-xxl}
export SOURCE_CKPT=${SOURCE_CKPT:-https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained_flant5xl.pth}
export STAGE1_CFG=projects/vpgtrans/scale_up/flant5xl_to_flant5xxl_stage1.yaml STAGE2_CFG=projects/vpgtrans/scale_up/flant5xl_to_flant5xxl_stage2.yaml
export MINI_SRC_LLM=t5 MINI_TGT_LLM=t5 MINI_SOURCE="blip2_t5_transfer tiny_t5"   # the toy stand-ins
exec bash run_scripts/vpgtrans/_transfer.sh
