#!/usr/bin/env bash
# Create the virtual environment under installer_files/ and install the pinned requirements
# for this machine (NVIDIA GPU, Apple Silicon or CPU). Idempotent: a stamp file records what
# was installed, and a second run with unchanged requirements returns in well under a second.
#
# Usage: scripts/install.sh [--dev]     (--dev adds the test tools of requirements-dev.txt)
#        scripts/install.sh --extensions NAME...   (only those extensions' packages, into the
#        existing environment: extensions/NAME/requirements.txt, see scripts/install_extensions.py)
set -euo pipefail
cd "$(dirname "$0")/.."

ENV_DIR=installer_files/env
PYTHON=${PYTHON:-python3}
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

if [ "${1:-}" = "--extensions" ]; then
  shift
  [ $# -gt 0 ] || { echo "Usage: scripts/install.sh --extensions NAME..." >&2; exit 2; }
  [ -x "$ENV_DIR/bin/python" ] || { echo "No environment in $ENV_DIR yet: run scripts/install.sh first." >&2; exit 1; }
  exec "$ENV_DIR/bin/python" scripts/install_extensions.py "$@"
fi

if [ -x "$ENV_DIR/bin/python" ]; then :; else
  command -v "$PYTHON" >/dev/null || { echo "Python 3.10 or newer is needed (set PYTHON=/path/to/python3)." >&2; exit 1; }
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "Python 3.10 or newer is needed; $PYTHON is $("$PYTHON" -V 2>&1)." >&2; exit 1; }
  echo "Creating the virtual environment in $ENV_DIR"
  "$PYTHON" -m venv "$ENV_DIR"
fi
PY="$ENV_DIR/bin/python"

# Which build: CUDA when nvidia-smi sees a GPU, Metal on Apple Silicon, else CPU.
kind=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  kind=cuda
elif [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
  kind=metal
fi
export GPU_KIND=$kind

reqs=(-r requirements.txt)
[ "$kind" = cuda ] && reqs+=(-r requirements-cuda.txt)
stamp_of() { cat "$@" scripts/install_llama_cpp.sh | sha256sum | cut -c1-16; }
app_stamp="$kind $(stamp_of requirements.txt requirements-cuda.txt)"

if [ "$(cat "$ENV_DIR/.installed-app" 2>/dev/null)" != "$app_stamp" ]; then
  echo "Installing requirements for a $kind machine (once; later starts skip this)"
  extra=()
  # PyPI's Linux torch wheel carries several GB of CUDA libraries: CPU-only machines take the
  # CPU build from PyTorch's own index when it can be reached.
  if [ "$kind" = cpu ] && [ "$(uname -s)" = Linux ] && [ -z "${PIP_EXTRA_INDEX_URL:-}" ] \
     && "$PY" -c 'import urllib.request as u; u.urlopen("https://download.pytorch.org/whl/cpu/", timeout=5)' 2>/dev/null; then
    extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  "$PY" -m pip install --upgrade "pip>=23.2" >/dev/null
  "$PY" -m pip install ${extra[@]+"${extra[@]}"} "${reqs[@]}"
  bash scripts/install_llama_cpp.sh "$PY" "$kind"
  echo "$app_stamp" > "$ENV_DIR/.installed-app"
fi

# GPTQModel for the gptq loader (see requirements-gptq.txt for why it is optional on CPU):
# on a GPU machine, with --dev (the tests quantise on CPU), or when INSTALL_GPTQ=1 asks.
# Constrained by requirements.txt so it never moves the pinned torch/transformers/numpy.
if [ "$kind" = cuda ] || [ "$DEV" = 1 ] || [ "${INSTALL_GPTQ:-0}" = 1 ]; then
  gptq_stamp=$(stamp_of requirements.txt requirements-gptq.txt)
  if [ "$(cat "$ENV_DIR/.installed-gptq" 2>/dev/null)" != "$gptq_stamp" ]; then
    echo "Installing GPTQModel for GPTQ models (once)"
    "$PY" -m pip install -r requirements-gptq.txt -c requirements.txt
    echo "$gptq_stamp" > "$ENV_DIR/.installed-gptq"
  fi
fi

if [ "$DEV" = 1 ]; then
  dev_stamp=$(stamp_of requirements-dev.txt requirements-dev-nodeps.txt)
  if [ "$(cat "$ENV_DIR/.installed-dev" 2>/dev/null)" != "$dev_stamp" ]; then
    "$PY" -m pip install -r requirements-dev.txt
    "$PY" -m pip install --no-deps -r requirements-dev-nodeps.txt
    echo "$dev_stamp" > "$ENV_DIR/.installed-dev"
  fi
fi
