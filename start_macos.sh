#!/usr/bin/env bash
# One click for macOS: the same steps as start_linux.sh (scripts/install.sh builds llama.cpp
# with Metal on Apple Silicon), then start the web UI.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
exec installer_files/env/bin/python server.py "$@"
