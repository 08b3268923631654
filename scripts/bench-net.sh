#!/usr/bin/env bash
# The sandbox network against QEMU's own user-mode network (slirp), side by side in one run:
# the same guest, kernel, NIC and guest tool (capsa-init net-bench), each backend in a fresh
# network namespace holding only lo (the test enters it), servers on 127.0.0.1.
#   scripts/bench-net.sh [MIB] [RUNS]     (defaults: 256 MiB each way, 5 runs)
# Needs root (the namespace) and qemu-system-x86 built with slirp (Debian's is).
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-256}
RUNS=${2:-5}
cargo nextest run -p capsa --test network --no-run >/dev/null 2>&1 || cargo nextest run -p capsa --test network --no-run
echo "load: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores, $(date -u +%FT%TZ)"
for backend in capsa slirp; do
  CAPSA_BENCH_BACKEND=$backend CAPSA_BENCH_MIB=$MIB CAPSA_BENCH_RUNS=$RUNS \
    cargo nextest run -p capsa --test network --run-ignored only --no-capture bench_ 2>&1 \
    | grep '^BENCH' | sed 's/^BENCH //'
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
