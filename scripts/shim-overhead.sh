#!/usr/bin/env bash
# Memory of idle capsa containerd tasks, for the RuntimeClass `overhead`:
# N detached `ctr run -d --runtime io.containerd.capsa.v2 IMAGE ID sleep 600`
# (restored from the base snapshot), then RSS and PSS of each task's QEMU,
# capsa-vmm monitor and shim from /proc (PSS splits shared pages, e.g. the
# QEMU binary, between the VMs). Same private containerd and image as
# scripts/bench-containerd-shim.sh.
#
#   scripts/shim-overhead.sh [N]     (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-3}"
# shellcheck source=scripts/lib/containerd-bench.sh
. scripts/lib/containerd-bench.sh

mem() { # pid -> "rss_kib pss_kib"
  awk '/^Rss:/ {r=$2} /^Pss:/ {p=$2} END {print r, p}' "/proc/$1/smaps_rollup"
}
# The first task boots cold and saves the base snapshot; not measured.
ctr -a "$d/c.sock" -n bench run --rm --runtime io.containerd.capsa.v2 "$img" warm true </dev/null >/dev/null
for i in $(seq "$n"); do
  ctr -a "$d/c.sock" -n bench run -d --runtime io.containerd.capsa.v2 "$img" "idle$i" sleep 600 </dev/null >/dev/null
done
sleep 5
[ "${BUSY:-0}" = 1 ] && for i in $(seq "$n"); do ctr -a "$d/c.sock" -n bench task exec --exec-id busy "idle$i" sh -c "i=0; while [ \$i -lt 20000 ]; do i=\$((i+1)); done; ls -R / >/dev/null" >/dev/null 2>&1; done
ps -e -o pid,ppid,rss,comm --forest | grep -E "capsa|qemu|shim" >&2
printf "%-8s %-10s %10s %10s\n" task process rss_mib pss_mib
for s in "$CAPSA_STATE_DIR"/sandboxes/*; do
  id=$(grep -o '"containerd.id": "[^"]*"' "$s/sandbox.json" | cut -d'"' -f4)
  mon=$(cat "$s/monitor.pid")
  qemu=$(pgrep -P "$mon" -f qemu-system | head -n1)
  shim=$(pgrep -f "containerd-shim-capsa-v2 .*-id $id( |$)" | head -n1)
  for p in $qemu $mon $shim; do
    read -r rss pss < <(mem "$p")
    printf "%-8s %-16s %10.1f %10.1f\n" "$id" "$(cat /proc/$p/comm)" "$(awk -v k="$rss" 'BEGIN{print k/1024}')" "$(awk -v k="$pss" 'BEGIN{print k/1024}')"
  done
done
for i in $(seq "$n"); do
  ctr -a "$d/c.sock" -n bench task kill -s SIGKILL "idle$i" >/dev/null 2>&1 || true
done
sleep 2
for i in $(seq "$n"); do
  ctr -a "$d/c.sock" -n bench task delete "idle$i" >/dev/null 2>&1 || true
  ctr -a "$d/c.sock" -n bench container rm "idle$i" >/dev/null 2>&1 || true
done
