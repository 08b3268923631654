#!/usr/bin/env bash
# Benchmarks of the image store's sources (issue 11), side by side in one run, medians of RUNS:
#   1. capsa image build py --debian bookworm --packages python3,git: cold (empty .deb cache)
#      and with cached .debs and package lists;
#   2. that image pushed to a loopback docker-registry (skopeo gzips the layer), then
#      capsa image pull + EROFS conversion: cold (empty store), cached by tag (one HEAD) and
#      cached by digest (no registry);
#   3. umoci raw unpack of the same gzip layer, for scale.
# Usage: cargo build --release -p capsa-cli && scripts/bench-images.sh [RUNS]
# Needs docker-registry, skopeo, mmdebstrap, umoci (scripts/setup.sh) and the Debian mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
BUILD_RUNS=${BUILD_RUNS:-$RUNS}   # mmdebstrap runs take minutes: BUILD_RUNS=1 to re-measure pulls
CAPSA=${CAPSA:-$PWD/target/release/capsa}
PKGS=python3,git
for t in docker-registry skopeo mmdebstrap umoci python3; do
  command -v "$t" >/dev/null || { echo "bench-images: $t missing; fix: scripts/setup.sh" >&2; exit 1; }
done
[ -x "$CAPSA" ] || { echo "bench-images: $CAPSA missing; fix: cargo build --release -p capsa-cli" >&2; exit 1; }

W=$(mktemp -d /tmp/capsa-bench-images.XXXXXX)
REG_PID=""
cleanup() {
  if [ -n "$REG_PID" ]; then kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
now_ms() { date +%s%3N; }
median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.0f}")' "$@"; }
jget() { python3 -c 'import sys,json; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }
echo "load: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores, $("$CAPSA" --version 2>/dev/null || echo capsa)" >&2

# --- 1. Debian builds -------------------------------------------------------------------------
cold_total=(); cold_mm=(); warm_total=(); warm_mm=()
for i in $(seq "$BUILD_RUNS"); do
  out=$W/cold-$i.json
  XDG_CACHE_HOME=$W/cold-$i CAPSA_DEB_CACHE=$W/debs-cold-$i \
    "$CAPSA" image build py --debian bookworm --packages $PKGS --json >"$out" 2>"$W/cold-$i.err"
  cold_total+=("$(jget "$out" total_ms)"); cold_mm+=("$(jget "$out" mmdebstrap_ms)")
  echo "build cold $i: $(jget "$out" total_ms) ms (mmdebstrap $(jget "$out" mmdebstrap_ms))" >&2
  # Keep the first run's .debs as the warm cache; drop the rest.
  if [ "$i" = 1 ]; then mv "$W/debs-cold-1" "$W/debs-warm"; else rm -rf "$W/debs-cold-$i"; fi
  [ "$i" = 1 ] || rm -rf "$W/cold-$i"
done
for i in $(seq "$BUILD_RUNS"); do
  out=$W/warm-$i.json
  XDG_CACHE_HOME=$W/warm-$i CAPSA_DEB_CACHE=$W/debs-warm \
    "$CAPSA" image build py --debian bookworm --packages $PKGS --json >"$out" 2>"$W/warm-$i.err"
  [ "$(jget "$out" debs_downloaded)" = 0 ] || echo "warning: warm build downloaded .debs" >&2
  warm_total+=("$(jget "$out" total_ms)"); warm_mm+=("$(jget "$out" mmdebstrap_ms)")
  echo "build cached $i: $(jget "$out" total_ms) ms (mmdebstrap $(jget "$out" mmdebstrap_ms))" >&2
  [ "$i" = "$BUILD_RUNS" ] || rm -rf "$W/warm-$i"
done
# The same inputs again in that store: the stored image is reused, mmdebstrap does not run.
reuse_ms=(); reuse_wall=()
for i in $(seq "$RUNS"); do
  t0=$(now_ms)
  XDG_CACHE_HOME=$W/warm-$BUILD_RUNS CAPSA_DEB_CACHE=$W/debs-warm \
    "$CAPSA" image build py --debian bookworm --packages $PKGS --json >"$W/reuse-$i.json" 2>/dev/null
  reuse_wall+=("$(( $(now_ms) - t0 ))"); reuse_ms+=("$(jget "$W/reuse-$i.json" total_ms)")
  [ "$(jget "$W/reuse-$i.json" cached_image)" = True ] || echo "warning: build not reused" >&2
done
STORE=$W/cold-1/capsa/images
DIGEST=$(jget "$W/cold-1.json" digest)
ROOTFS=$(jget "$W/cold-1.json" rootfs)
files=$(dump.erofs -S "$ROOTFS" 2>/dev/null | awk -F: '/total file count/ {gsub(/[ \t]/,"",$2); print $2}')
tar_bytes=$(jget "$W/cold-1.json" size_bytes)

# --- 2. registry pull ---------------------------------------------------------------------------
# The built image as an OCI layout (hard links into the store), pushed with skopeo.
L=$W/layout; mkdir -p "$L/blobs/sha256"
echo '{"imageLayoutVersion":"1.0.0"}' >"$L/oci-layout"
mhex=${DIGEST#sha256:}
msize=$(stat -c %s "$STORE/blobs/sha256/$mhex")
python3 - "$STORE/blobs/sha256/$mhex" >"$W/blobs.txt" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for d in [m["config"]] + m["layers"]:
    print(d["digest"][7:])
EOF
for h in $mhex $(cat "$W/blobs.txt"); do ln "$STORE/blobs/sha256/$h" "$L/blobs/sha256/$h"; done
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"py"}}]}' \
  "$DIGEST" "$msize" >"$L/index.json"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$W/registry"
cat >"$W/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $W/registry
http:
  addr: 127.0.0.1:$PORT
EOF
docker-registry serve "$W/registry.yml" >"$W/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT))" 2>/dev/null && break; sleep 0.1; done
t0=$(now_ms)
skopeo --insecure-policy copy --quiet --dest-tls-verify=false --dest-compress-format gzip \
  "oci:$L:py" "docker://127.0.0.1:$PORT/py:1"
push_ms=$(( $(now_ms) - t0 ))
REF=127.0.0.1:$PORT/py:1
RDIGEST=$(skopeo inspect --tls-verify=false --format '{{.Digest}}' "docker://$REF")
gz_bytes=$(skopeo inspect --tls-verify=false --raw "docker://$REF" | python3 -c 'import json,sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))')

pull_cold=(); pull_cold_dl=(); unpack=(); mkfs=(); pull_tag=(); pull_digest=(); pull_tag_wall=(); pull_digest_wall=()
for i in $(seq "$RUNS"); do
  out=$W/pull-$i.json
  XDG_CACHE_HOME=$W/pull-$i NO_COLOR=1 RUST_LOG=capsa_oci=info "$CAPSA" image pull "$REF" --json >"$out" 2>"$W/pull-$i.err"
  pull_cold+=("$(jget "$out" total_ms)"); pull_cold_dl+=("$(jget "$out" pull_ms)")
  unpack+=("$(sed 's/\x1b\[[0-9;]*m//g' "$W/pull-$i.err" | grep -o 'unpack_ms=[0-9]*' | cut -d= -f2)")
  mkfs+=("$(sed 's/\x1b\[[0-9;]*m//g' "$W/pull-$i.err" | grep -o 'mkfs_ms=[0-9]*' | cut -d= -f2)")
  echo "pull cold $i: $(jget "$out" total_ms) ms (download+verify $(jget "$out" pull_ms))" >&2
  [ "$i" = 1 ] || rm -rf "$W/pull-$i"
done
# The same cold pull with the staging tree on the store's disk instead of tmpfs, interleaved
# run by run so that both see the same load.
disk_cold=(); disk_unpack=()
for i in $(seq "$RUNS"); do
  out=$W/dpull-$i.json
  XDG_CACHE_HOME=$W/dpull-$i CAPSA_STAGING=disk NO_COLOR=1 RUST_LOG=capsa_oci=info "$CAPSA" image pull "$REF" --json >"$out" 2>"$W/dpull-$i.err"
  disk_cold+=("$(jget "$out" total_ms)")
  disk_unpack+=("$(sed 's/\x1b\[[0-9;]*m//g' "$W/dpull-$i.err" | grep -o 'unpack_ms=[0-9]*' | cut -d= -f2)")
  echo "pull cold, staging on disk $i: $(jget "$out" total_ms) ms" >&2
  rm -rf "$W/dpull-$i"
done
for i in $(seq "$RUNS"); do
  t0=$(now_ms)
  XDG_CACHE_HOME=$W/pull-1 "$CAPSA" image pull "$REF" --json >"$W/tag-$i.json" 2>/dev/null
  pull_tag_wall+=("$(( $(now_ms) - t0 ))"); pull_tag+=("$(jget "$W/tag-$i.json" total_ms)")
  [ "$(jget "$W/tag-$i.json" downloaded_bytes)" = 0 ] || echo "warning: cached pull downloaded" >&2
  t0=$(now_ms)
  XDG_CACHE_HOME=$W/pull-1 "$CAPSA" image pull "127.0.0.1:$PORT/py@$RDIGEST" --json >"$W/dig-$i.json" 2>/dev/null
  pull_digest_wall+=("$(( $(now_ms) - t0 ))"); pull_digest+=("$(jget "$W/dig-$i.json" total_ms)")
done

# --- 3. umoci raw unpack of the same (gzip) layer -----------------------------------------------
skopeo --insecure-policy copy --quiet --src-tls-verify=false "docker://$REF" "oci:$W/umoci:py"
umoci_ms=()
for i in $(seq "$RUNS"); do
  t0=$(now_ms)
  umoci raw unpack --image "$W/umoci:py" "$W/umoci-out-$i" >/dev/null 2>&1
  umoci_ms+=("$(( $(now_ms) - t0 ))")
  rm -rf "$W/umoci-out-$i"
done

cat <<EOF

image: python3+git on Debian bookworm, ${files:-?} inodes, $((tar_bytes / 1000000)) MB uncompressed layer, $((gz_bytes / 1000000)) MB gzip in the registry (skopeo push: ${push_ms} ms)
| what | median (builds: $BUILD_RUNS runs, the rest $RUNS) |
|---|---|
| capsa image build --debian (cold: empty .deb cache), total incl. EROFS | $(median "${cold_total[@]}") ms (mmdebstrap $(median "${cold_mm[@]}") ms) |
| capsa image build --debian (cached .debs + lists), total incl. EROFS | $(median "${warm_total[@]}") ms (mmdebstrap $(median "${warm_mm[@]}") ms) |
| capsa image build --debian, same inputs again (image reused) | $(median "${reuse_ms[@]}") ms in-process, $(median "${reuse_wall[@]}") ms whole command |
| capsa image pull + convert, cold (empty store) | $(median "${pull_cold[@]}") ms (download+verify $(median "${pull_cold_dl[@]}") ms, unpack $(median "${unpack[@]}") ms, mkfs.erofs $(median "${mkfs[@]}") ms) |
| the same, staging tree on disk (CAPSA_STAGING=disk) | $(median "${disk_cold[@]}") ms (unpack $(median "${disk_unpack[@]}") ms) |
| capsa image pull, cached, by tag (one HEAD) | $(median "${pull_tag[@]}") ms in-process, $(median "${pull_tag_wall[@]}") ms whole command |
| capsa image pull, cached, by digest (no registry) | $(median "${pull_digest[@]}") ms in-process, $(median "${pull_digest_wall[@]}") ms whole command |
| umoci raw unpack of the same layer | $(median "${umoci_ms[@]}") ms |
EOF
