#!/usr/bin/env bash
# Builds the docs and takes headless-Chromium screenshots of a few pages, to look
# at them as a reader would (Debian: apt-get install chromium).
# Usage: scripts/screenshot_docs.sh [OUTDIR] [PAGE ...]   (pages relative to the site root)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-/tmp/keras-peft-shots}"; shift || true
pages=("${@:-}")
[ -n "${pages[0]}" ] || pages=("" "strategies/" "benchmarks/" "recipes/bert/")
make docs >/dev/null
mkdir -p "$out"
port=8765
(cd site && exec python3 -m http.server "$port" >/dev/null 2>&1) &
server=$!
trap 'kill $server' EXIT
sleep 1
for page in "${pages[@]}"; do
    name=$(echo "${page:-index}" | tr '/' '_' | sed 's/_$//')
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d)" --window-size=1280,2000 \
        --screenshot="$out/$name.png" "http://127.0.0.1:$port/$page" 2>/dev/null
    echo "$out/$name.png"
done
