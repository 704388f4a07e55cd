#!/usr/bin/env bash
# Zero-shot evaluation of one checkpoint on the paper's five benchmarks, then one table.
#
#   run_scripts/eval_all.sh CKPT MODEL TYPE [--data-root DIR] [--out DIR] [--nproc N]
#       [--benchmarks "coco_caption nocaps vqav2 okvqa gqa"] [--vqav2-subset N]
#       [--image-size N] [--no-lemmatizer] [-- KEY=VALUE ...]
#
#   CKPT   a checkpoint of trained parameters (e.g. output/.../checkpoint_best.pth), or "none"
#          to evaluate the model type's own weights (e.g. the released BLIP-2)
#   MODEL  blip2_opt_transfer | blip2_t5_transfer | blip2_llama | blip2_vicuna
#   TYPE   a model type of MODEL (e.g. opt6.7b, flant5xxl, vl_llama7b)
#   --data-root      where the benchmark files are (LAVIS layout, see lavis_vpgtrans/datasets/benchmarks.py;
#                    `python -m lavis_vpgtrans.toy.benchmarks --out DIR` writes synthetic ones)
#   --out            output folder (default output/eval/<MODEL>_<TYPE>); one sub-folder per benchmark
#   --nproc          processes per run (torch.distributed.run) when > 1
#   --vqav2-subset   evaluate a seeded N-question subset of VQAv2 val (the paper: 20000)
#   --image-size     eval image size (default: the configs' 224)
#   --no-lemmatizer  OK-VQA without the spaCy lemmatizer (when en_core_web_sm is not installed)
#   after --          extra evaluate.py --options for every run (e.g. run.device=cpu run.batch_size_eval=8)
set -u

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 3 ] || usage
CKPT=$1; MODEL=$2; TYPE=$3; shift 3
DATA_ROOT=""; OUT=""; NPROC=1; BENCHMARKS="coco_caption nocaps vqav2 okvqa gqa"
SUBSET=""; IMAGE_SIZE=""; LEMMATIZE=1; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data-root) DATA_ROOT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --benchmarks) BENCHMARKS=$2; shift 2 ;;
    --vqav2-subset) SUBSET=$2; shift 2 ;;
    --image-size) IMAGE_SIZE=$2; shift 2 ;;
    --no-lemmatizer) LEMMATIZE=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "eval_all.sh: unknown argument $1" >&2; usage ;;
  esac
done

case "$MODEL" in
  blip2_opt_transfer) FAMILY=opt ;;
  blip2_t5_transfer) FAMILY=t5 ;;
  blip2_llama|blip2_vicuna|blip2_vicuna_vpgtrans) FAMILY=llama ;;
  *) echo "eval_all.sh: unknown model $MODEL (blip2_opt_transfer, blip2_t5_transfer, blip2_llama, blip2_vicuna)" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python}
OUT=${OUT:-output/eval/${MODEL}_${TYPE}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# "toy:<dir>" (inside the toy zoo) is resolved by the builders; other paths made absolute.
if [ -n "$DATA_ROOT" ] && [ "${DATA_ROOT#toy:}" = "$DATA_ROOT" ]; then
  DATA_ROOT=$(cd "$DATA_ROOT" && pwd) || exit 2
fi
if [ "$CKPT" != "none" ]; then
  [ -f "$CKPT" ] || { echo "eval_all.sh: checkpoint not found: $CKPT" >&2; exit 2; }
  CKPT=$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")
fi
cd "$ROOT"  # evaluate.py and the package import from the repository root

if [ "$NPROC" -gt 1 ]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NPROC" "$ROOT/evaluate.py")
else
  LAUNCH=("$PYTHON" "$ROOT/evaluate.py")
fi

failed=()
for bench in $BENCHMARKS; do
  cfg="$ROOT/projects/vpgtrans/eval/$FAMILY/$bench.yaml"
  [ -f "$cfg" ] || { echo "eval_all.sh: no config $cfg" >&2; failed+=("$bench"); continue; }
  ds="vpgtrans_$bench"
  opts=("model.arch=$MODEL" "model.model_type=$TYPE" "run.output_dir=$OUT/$bench" "run.job_id=eval")
  [ -n "$DATA_ROOT" ] && opts+=("datasets.$ds.data_root=$DATA_ROOT")
  [ -n "$IMAGE_SIZE" ] && opts+=("datasets.$ds.vis_processor.eval.image_size=$IMAGE_SIZE")
  [ "$bench" = vqav2 ] && [ -n "$SUBSET" ] && opts+=("run.question_subset=$SUBSET")
  [ "$bench" = okvqa ] && [ "$LEMMATIZE" = 0 ] && opts+=("run.apply_lemmatizer=False")
  ckpt_arg=()
  [ "$CKPT" != "none" ] && ckpt_arg=(--ckpt "$CKPT")
  rm -f "$OUT/$bench/eval/evaluate.txt"  # a rerun must not show a stale result
  echo "== $bench: $cfg (log: $OUT/$bench.log)"
  if ! "${LAUNCH[@]}" --cfg-path "$cfg" "${ckpt_arg[@]}" --options "${opts[@]}" "${EXTRA[@]}" > "$OUT/$bench.log" 2>&1; then
    echo "   FAILED; last lines of $OUT/$bench.log:" >&2
    tail -n 5 "$OUT/$bench.log" >&2
    failed+=("$bench")
  fi
done

echo
echo "Zero-shot results: $MODEL $TYPE, checkpoint $CKPT"
"$PYTHON" "$ROOT/lavis_vpgtrans/analysis/eval_table.py" "$OUT" --benchmarks $BENCHMARKS --json "$OUT/summary.json"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
