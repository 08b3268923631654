#!/usr/bin/env bash
# Wall time of `ctr run --rm IMAGE true` with capsa's shim (io.containerd.capsa.v2)
# vs runc (io.containerd.runc.v2) on the same image, in one run: a private
# containerd in a temp dir, a one-layer busybox image built here from the
# host's static busybox. Four rows:
#   runc; capsa cold (CAPSA_SHIM_FAST_START=0: every task boots its VM);
#   capsa restored (the default: the base snapshot is restored per task);
#   capsa pooled (CAPSA_SHIM_POOL_SIZE=1: a pre-restored member is claimed;
#   between timed runs the script waits, untimed, for the refill to finish, so
#   each run finds a ready member, as a pool with idle time between tasks does).
# containerd is restarted with each variant's environment (its shims inherit it).
#
#   scripts/bench-containerd-shim.sh [RUNS]     (default 7; medians printed)
#
# Needs root, containerd (apt-get install containerd), busybox-static, and a
# built shim (cargo build -p containerd-shim-capsa -p capsa-vmm; target/debug is put first on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-7}"
# shellcheck source=scripts/lib/containerd-bench.sh
. scripts/lib/containerd-bench.sh
# Idle pool members are VMs of their own: removed when a variant ends.
remove_pool() {
  local s
  for s in "$CAPSA_STATE_DIR"/sandboxes/ctrdpool-*; do
    [ -d "$s" ] && "$bin/capsa" rm -f "$(basename "$s")" >/dev/null 2>&1 || true
  done
}
pool_ready() {
  grep -ls '"containerd.pool_state": "ready"' "$CAPSA_STATE_DIR"/sandboxes/*/sandbox.json >/dev/null 2>&1
}
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m}'; }
bench() { # label runtime [wait-for-pool]
  local label="$1" rt="$2" pool="${3:-}" i t0 t1
  # One untimed run first (the capsa shim converts the snapshot to EROFS once
  # per layer chain and saves the base snapshot).
  ctr -a "$d/c.sock" -n bench run --rm --runtime "$rt" "$img" "warm-$RANDOM" true </dev/null >/dev/null
  for i in $(seq "$runs"); do
    if [ -n "$pool" ]; then
      for _ in $(seq 600); do pool_ready && break; sleep 0.2; done
      pool_ready || { echo "no ready pool member after 120 s; see $d/containerd.log" >&2; exit 1; }
    fi
    t0=$(date +%s.%N)
    ctr -a "$d/c.sock" -n bench run --rm --runtime "$rt" "$img" "b$i-$RANDOM" true </dev/null >/dev/null
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f\n", b - a }'
  done > "$d/$label.times"
  echo "$label $(median < "$d/$label.times")  (all: $(tr '\n' ' ' < "$d/$label.times"))"
}
echo "ctr run --rm IMAGE true, $runs runs each (median seconds):"
bench runc io.containerd.runc.v2
start_containerd CAPSA_SHIM_FAST_START=0
bench capsa-cold io.containerd.capsa.v2
start_containerd
bench capsa-restored io.containerd.capsa.v2
start_containerd CAPSA_SHIM_POOL_SIZE=1
bench capsa-pooled io.containerd.capsa.v2 wait
# The last shim's refill restores one more member: let it finish, then remove it.
sleep 1; for _ in $(seq 600); do pool_ready && break; sleep 0.2; done; remove_pool
grep -c 'how="pooled"' "$d/containerd.log" | sed 's/^/tasks served from the pool: /'
[ "${SHOW_LOG:-0}" = 1 ] && grep -E "sandbox ready|pool member ready" "$d/containerd.log" | tail -n 20 || true
