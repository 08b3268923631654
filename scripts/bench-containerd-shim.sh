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
bin="$PWD/target/debug"
[ -x "$bin/containerd-shim-capsa-v2" ] || { echo "build the shim first: cargo build -p containerd-shim-capsa" >&2; exit 1; }
command -v containerd >/dev/null || { echo "install containerd: apt-get install containerd" >&2; exit 1; }
d="$(mktemp -d /tmp/ctrbench.XXXXXX)"
cleanup() {
  [ -n "${cpid:-}" ] && kill "$cpid" 2>/dev/null && wait "$cpid" 2>/dev/null || true
  for s in "$d"/capsa-state/sandboxes/*; do [ -d "$s" ] && CAPSA_STATE_DIR="$d/capsa-state" "$bin/capsa" rm -f "$(basename "$s")" >/dev/null 2>&1; done || true
  grep -o " $d[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$d"
}
trap cleanup EXIT
python3 - "$d/image.tar" <<'PY'
import hashlib, io, json, sys, tarfile
def add(t, name, data=b"", mode=0o644, kind=tarfile.REGTYPE, link=""):
    i = tarfile.TarInfo(name); i.mode = mode; i.type = kind; i.linkname = link; i.size = len(data)
    t.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
lb = io.BytesIO()
with tarfile.open(fileobj=lb, mode="w", format=tarfile.USTAR_FORMAT) as t:
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"]:
        add(t, d, mode=0o755, kind=tarfile.DIRTYPE)
    add(t, "bin/busybox", open("/bin/busybox", "rb").read(), 0o755)
    for a in ["sh", "true", "echo", "sleep"]:
        add(t, "bin/" + a, kind=tarfile.SYMTYPE, link="busybox")
layer = lb.getvalue()
cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}).encode()
cname = hashlib.sha256(cfg).hexdigest() + ".json"
man = json.dumps([{"Config": cname, "RepoTags": ["capsa-bench/busybox:1"], "Layers": ["l0/layer.tar"]}]).encode()
with tarfile.open(sys.argv[1], "w", format=tarfile.USTAR_FORMAT) as t:
    for n, data in [("manifest.json", man), (cname, cfg), ("l0/layer.tar", layer)]:
        add(t, n, data)
PY
cat > "$d/config.toml" <<TOML
version = 2
root = "$d/root"
state = "$d/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/c.sock"
TOML
export PATH="$bin:$PATH" CAPSA_STATE_DIR="$d/capsa-state" CAPSA_SHIM_ROOTFS_CACHE="$d/rootfs-cache"
start_containerd() { # ENV=VALUE...
  stop_containerd
  env "$@" containerd --config "$d/config.toml" >>"$d/containerd.log" 2>&1 &
  cpid=$!
  for _ in $(seq 100); do ctr -a "$d/c.sock" version >/dev/null 2>&1 && return; sleep 0.2; done
  echo "containerd did not start; see $d/containerd.log" >&2; exit 1
}
stop_containerd() {
  [ -n "${cpid:-}" ] || return 0
  kill "$cpid" 2>/dev/null || true; wait "$cpid" 2>/dev/null || true; cpid=
}
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
start_containerd
ctr -a "$d/c.sock" -n bench image import "$d/image.tar" >/dev/null
img=docker.io/capsa-bench/busybox:1
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
