#!/usr/bin/env bash
# The desktop image at 1280x800 under TCG, side by side in one VM (numbers in BENCHMARKS.md):
# screenshots by capsa against scrot in the guest, pointer move to pixel by capsa against
# xdotool in the guest, and a headless chromium screenshot in the guest against the same on
# the host (if the host has chromium).
#
#   scripts/bench-desktop.sh [SAMPLES]
#
# Builds desktop:bookworm with the README's command (the recipe plus chromium) first.
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-30}"
cargo build --release -p capsa-cli -p capsa --example bench_desktop
capsa=./target/release/capsa
"$capsa" image build >/dev/null
t0=$(date +%s.%N)
"$capsa" image build desktop:bookworm --debian bookworm --recipe desktop --packages chromium
echo "image build: $(echo "$(date +%s.%N) $t0" | awk '{printf "%.1f", $1 - $2}') s" >&2
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(qemu-system-x86_64 --version | head -n 1)"
./target/release/examples/bench_desktop desktop:bookworm "$n"
if command -v chromium >/dev/null; then
  page='data:text/html,<h1>capsa</h1><p>hello from a headless browser</p>'
  for i in 1 2 3; do
    a=$(date +%s%N)
    (cd /tmp && chromium --headless --no-sandbox --disable-gpu --window-size=1280,800 \
      --screenshot=/tmp/capsa-bench-host.png "$page" >/dev/null 2>&1)
    b=$(date +%s%N)
    test -s /tmp/capsa-bench-host.png && rm -f /tmp/capsa-bench-host.png
    echo "| headless chromium screenshot on the host, run $i | $(( (b - a) / 1000000 )) ms | $(chromium --version 2>/dev/null) |"
  done
fi
