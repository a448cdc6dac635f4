#!/usr/bin/env bash
# Run flowhost on http://127.0.0.1:8000 with the bundled plugins, against the
# embedded ComfyUI test double (no GPU needed). Extra arguments go to
# `flowhost serve` (e.g. --comfyui-url http://127.0.0.1:8188 for a real ComfyUI).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-plugins.sh .flowhost/plugins
exec cargo run -p flowhost -- serve --plugins .flowhost/plugins "$@"
