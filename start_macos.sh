#!/usr/bin/env bash
# One click for macOS: the same steps as start_linux.sh (scripts/install.sh builds llama.cpp
# with Metal on Apple Silicon), then start the web UI.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
# The packages of the extensions settings.yaml / CMD_FLAGS.txt / these arguments enable (once each);
# a failure leaves that extension disabled, with the reason in the log, and the UI still starts.
installer_files/env/bin/python scripts/install_extensions.py --enabled "$@" \
  || echo "Some extensions' packages did not install: those extensions stay disabled." >&2
exec installer_files/env/bin/python server.py "$@"
