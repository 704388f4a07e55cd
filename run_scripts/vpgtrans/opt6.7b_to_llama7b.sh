#!/usr/bin/env bash
# VPGTrans opt6.7b_to_llama7b: converter, stage 1 and stage 2 (see _transfer.sh for the environment).
#   DATA=/data NPROC=8 bash run_scripts/vpgtrans/opt6.7b_to_llama7b.sh
#   VPGTRANS_MINIATURE=1 bash run_scripts/vpgtrans/opt6.7b_to_llama7b.sh   # in miniature on the toy zoo (CPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
export NAME=opt6.7b_to_llama7b SRC_ARCH=blip2_opt TGT_ARCH=blip2_llama
export SRC_LLM=${SRC_LLM:-facebook/opt-6.7b} TGT_LLM=${TGT_LLM:-huggyllama/llama-7b}
export SOURCE_CKPT=${SOURCE_CKPT:-https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained_opt6.7b.pth}
export STAGE1_CFG=projects/vpgtrans/scale_up/opt6.7b_to_llama7b_stage1.yaml STAGE2_CFG=projects/vpgtrans/scale_up/opt6.7b_to_llama7b_stage2.yaml
export MINI_SRC_LLM=opt-large MINI_TGT_LLM=llama MINI_SOURCE="blip2_opt_transfer tiny_opt_large"   # the toy stand-ins
exec bash run_scripts/vpgtrans/_transfer.sh
