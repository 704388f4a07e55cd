#!/usr/bin/env bash
# The demo command: builds .venv/ if needed, then runs the offline CPU VPGTrans experiment in
# miniature (python -m lavis_vpgtrans.demo; extra arguments are passed on, see --help);
# `--pformer` first runs the P-Former experiment instead (python -m lavis_vpgtrans.demo pformer).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = "--pformer" ]; then
  shift
  set -- pformer "$@"
fi
exec .venv/bin/python -m lavis_vpgtrans.demo "$@"
