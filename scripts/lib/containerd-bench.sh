# Shared by scripts/bench-containerd-shim.sh and scripts/shim-overhead.sh (sourced,
# from the repository root): a private containerd in a temp dir ($d) with capsa's
# shim on PATH, a one-layer busybox image built from the host's static busybox and
# imported as $img, start_containerd/stop_containerd, and cleanup on exit.
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
start_containerd
ctr -a "$d/c.sock" -n bench image import "$d/image.tar" >/dev/null
img=docker.io/capsa-bench/busybox:1
