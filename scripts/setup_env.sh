#!/usr/bin/env bash
# Builds .venv/ at the repo root with LAVIS 1.0.2, a transformers that has LLaMA, and this
# plugin (editable). Idempotent: does nothing when .venv already matches requirements.txt.
#
# Why two steps: salesforce-lavis 1.0.2 pins transformers<4.27 (no LLaMA; its vendored
# OPT/T5 break beam search from 4.27 on). requirements.txt lists everything LAVIS needs
# with a newer transformers, then LAVIS itself goes in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
stamp_of() { cat requirements.txt setup.py | sha256sum | cut -d' ' -f1; }

if [ -f .venv/.installed ] && [ "$(cat .venv/.installed)" = "$(stamp_of)" ]; then
  exit 0
fi

echo "[setup_env] building .venv (LAVIS 1.0.2 + transformers from requirements.txt)"
# torch's CUDA build (the CPU wheels are not on PyPI) makes .venv about 7 GiB: say so up front
# rather than leave pip's "No space left on device" halfway through to explain it
free_gib=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "${free_gib:-0}" -lt 10 ]; then
  echo "[setup_env] warning: ${free_gib} GiB free on the filesystem of $PWD; .venv needs about 7 GiB" \
    "plus pip's temporary files (about 10 GiB in all)" >&2
fi
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
.venv/bin/python -m pip install --quiet --no-deps salesforce-lavis==1.0.2
.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
.venv/bin/python -c "import lavis_vpgtrans" # fail here, not in the tests, if the stack is broken
stamp_of > .venv/.installed
echo "[setup_env] done"
