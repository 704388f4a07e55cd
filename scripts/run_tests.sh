#!/usr/bin/env bash
# The test command: builds .venv/ if needed, then runs the whole suite offline on CPU, a
# test file per pytest-xdist worker, two workers (one per core of the 2-core CI machine; three
# were slower there: tests 9 min 8 s vs 8 min 49 s), the slowest files first (tests/conftest.py
# orders them; xdist would order by test count; add "-n 0" to run in one process, or "-n 4" on a
# bigger machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# lmms-eval and img2dataset in .venv/tools, layered over .venv: built while the suite runs (two
# test files use it; they wait for the exit status written below, tests/helpers.py)
export VPGTRANS_TOOLS_BUILD_STATUS=$PWD/.venv/tools-build.status
rm -f "$VPGTRANS_TOOLS_BUILD_STATUS"
(bash scripts/setup_tools_env.sh > .venv/tools-build.log 2>&1; echo $? > "$VPGTRANS_TOOLS_BUILD_STATUS") &
tools_build=$!
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
.venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests "$@" || status=$?
wait "$tools_build" || true
exit "$status"
