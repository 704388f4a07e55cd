#!/usr/bin/env bash
# The demo command: builds .venv/ if needed, then runs the offline CPU VPGTrans experiment in
# miniature (python -m lavis_vpgtrans.demo; extra arguments are passed on, see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m lavis_vpgtrans.demo "$@"
