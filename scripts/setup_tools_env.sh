#!/usr/bin/env bash
# Builds .venv/tools/: the tools whose pins clash with the stack, layered over .venv:
#   - lmms-eval 0.7.3 and this plugin (its `lmms_eval.models` entry point; tests/test_lmms_eval.py);
#   - img2dataset 1.47.0 (writes webdataset shards from URL lists; tests/test_own_data_formats.py).
# Idempotent: does nothing when the env matches .venv, setup.py and this script.
#
# Why a separate environment:
#   - lmms-eval 0.7.3 pins wandb==0.25.0, which needs protobuf<7, and .venv has protobuf 7
#     (`pip install --dry-run -c <.venv's pins> lmms-eval==0.7.3` ends in ResolutionImpossible); its
#     evaluator also patches filelock._api, which filelock 4 (.venv's) no longer has, although its
#     metadata does not say so;
#   - img2dataset imports wandb when loaded, and with wandb installed timm (LAVIS's) imports it too,
#     so every `import lavis` in .venv would pay wandb's import (seconds per process; the suite
#     starts hundreds); its metadata also pins webdataset<0.3 (it runs on .venv's 1.0.2), hence --no-deps.
# Why layered: torch and the rest of the stack are gigabytes, so the env reuses .venv's packages (a
# .pth file adds .venv's site-packages after its own) and installs only what the tools add, under
# constraints that hold every package of .venv at its version except protobuf, wandb and filelock,
# which the env shadows with older ones. .venv itself is never written to (checked).
#
#   scripts/setup_tools_env.sh && .venv/tools/bin/python -m lmms_eval --model vpgtrans_opt ...
#                                 .venv/tools/bin/img2dataset --url_list ... --output_format webdataset
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_DIR=.venv/tools
LMMS_EVAL_VERSION=0.7.3
IMG2DATASET_VERSION=1.47.0
if [ ! -x .venv/bin/python ]; then
  echo "[setup_tools_env] .venv not found: run scripts/setup_env.sh first" >&2
  exit 1
fi
pins=$(.venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check)
stamp=$( { cat "$0" setup.py; echo "$pins"; } | sha256sum | cut -d' ' -f1)
if [ -f "$ENV_DIR/.installed" ] && [ "$(cat "$ENV_DIR/.installed")" = "$stamp" ]; then
  exit 0
fi

echo "[setup_tools_env] building $ENV_DIR (lmms-eval $LMMS_EVAL_VERSION, img2dataset $IMG2DATASET_VERSION over .venv)"
rm -rf "$ENV_DIR"
base_python=$(.venv/bin/python -c "import os, sys; print(os.path.join(sys.base_prefix, 'bin', 'python3'))")
"$base_python" -m venv --without-pip "$ENV_DIR"  # pip comes from .venv, through the .pth below
purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
venv_site=$(purelib .venv/bin/python)
# addsitedir (not a bare path line): .venv's own .pth files (the plugin's editable install) run too
echo "import site; site.addsitedir('$venv_site')" > "$(purelib "$ENV_DIR/bin/python")/_vpgtrans_base_venv.pth"
echo "$pins" | grep -viE '^(protobuf|wandb|filelock)==' > "$ENV_DIR/constraints.txt"
install() { "$ENV_DIR/bin/python" -m pip install --quiet --disable-pip-version-check -c "$ENV_DIR/constraints.txt" "$@"; }
install --no-build-isolation -e ".[lmms-eval]" "protobuf<7" "filelock<4"
install --no-deps --ignore-installed "img2dataset==$IMG2DATASET_VERSION"  # its console script goes in the env
# what img2dataset imports when loaded (wandb: lmms-eval's 0.25.0, installed above)
install fire==0.7.1 exifread-nocycle==3.0.1 "albumentations==1.3.1"  # 1.3.1: the last that keeps opencv-python-headless
# .venv unchanged (pip does not uninstall outside the env it installs into; checked, not assumed)
if [ "$(.venv/bin/python -m pip freeze --exclude-editable --disable-pip-version-check)" != "$pins" ]; then
  echo "[setup_tools_env] error: installing the tools changed .venv's packages" >&2
  exit 1
fi
"$ENV_DIR/bin/python" -c "from lmms_eval.models import get_model; get_model('vpgtrans_opt'); import img2dataset"
echo "$stamp" > "$ENV_DIR/.installed"
echo "[setup_tools_env] done"
