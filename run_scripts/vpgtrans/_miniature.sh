# Sourced by explore.sh, _transfer.sh and run_scripts/own_data/*.sh. With VPGTRANS_MINIATURE=1 the same commands run in
# miniature (run_scripts/vpgtrans/miniature.py): toy models and a toy data root in the real
# layout (DATA, default output/vpgtrans/miniature/data), CPU, NPROC=1 unless set, tiny runs.
# Output dirs, job ids and the checkpoint paths the runs hand each other stay the recipe's.
MINIATURE=${VPGTRANS_MINIATURE:-0}
if [ "$MINIATURE" = 1 ]; then
  NPROC=${NPROC:-1}
  DATA=${DATA:-$PWD/output/vpgtrans/miniature/data}  # absolute: a relative data_root resolves against LAVIS's cache_root
  if [ "${MINIATURE_PAPER_DATA:-1}" = 1 ]; then
    ZOO=$($PY run_scripts/vpgtrans/miniature.py data "$DATA")
  else  # the own-data scripts read no paper dataset: the zoo alone
    ZOO=$($PY run_scripts/vpgtrans/miniature.py zoo)
  fi
fi

# train CFG [OPTION ...]: train.py under torchrun, with the miniature's options when switched on
train() {
  local cfg=$1 mini=()
  shift
  if [ "$MINIATURE" = 1 ]; then
    MINI_TEXT=$($PY run_scripts/vpgtrans/miniature.py options "$cfg" "$@")
    mapfile -t mini <<< "$MINI_TEXT"
  fi
  $PY -m torch.distributed.run --nproc_per_node="$NPROC" train.py --cfg-path "$cfg" --options "$@" "${mini[@]}"
}

# evaluate CFG CKPT [OPTION ...]: evaluate.py on a checkpoint, with the miniature's options when switched on
evaluate() {
  local cfg=$1 ckpt=$2 mini=()
  shift 2
  if [ "$MINIATURE" = 1 ]; then
    MINI_TEXT=$($PY run_scripts/vpgtrans/miniature.py options "$cfg" "$@")
    mapfile -t mini <<< "$MINI_TEXT"
  fi
  $PY evaluate.py --cfg-path "$cfg" --ckpt "$ckpt" --options "$@" "${mini[@]}"
}
