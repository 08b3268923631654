#!/usr/bin/env bash
# Installs what capsa needs on a Debian/Ubuntu host, only where it is missing,
# and says what it installs. Safe to run again: it does nothing when all is there.
set -euo pipefail

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || need_pkgs+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || need_pkgs+=(qemu-utils)
# capsa's initramfs needs a *static* busybox (Debian's busybox-static).
if ! { [ -x /bin/busybox ] && ! LC_ALL=C readelf -l /bin/busybox 2>/dev/null | grep -q 'Requesting program interpreter'; }; then
  need_pkgs+=(busybox-static)
fi
command -v dpkg-deb >/dev/null 2>&1 || need_pkgs+=(dpkg)
command -v readelf >/dev/null 2>&1 || need_pkgs+=(binutils)
# The API fuzzer (scripts/api-fuzz.sh) runs schemathesis in a venv and probes with curl.
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
# The interactive-terminal tests (crates/capsa-cli/tests/tty.rs) drive the CLI in tmux.
command -v tmux >/dev/null 2>&1 || need_pkgs+=(tmux)
# OCI images become read-only root filesystems (crates/capsa-oci): mkfs.ext4 + debugfs, mkfs.erofs.
{ [ -x /usr/sbin/mkfs.ext4 ] || [ -x /sbin/mkfs.ext4 ]; } && { [ -x /usr/sbin/debugfs ] || [ -x /sbin/debugfs ]; } \
  || need_pkgs+=(e2fsprogs)
command -v mkfs.erofs >/dev/null 2>&1 || [ -x /usr/bin/mkfs.erofs ] || need_pkgs+=(erofs-utils)
# Image sources (capsa image pull / build --debian) and their tests: a loopback registry
# (docker-registry, htpasswd from apache2-utils for its basic auth), skopeo to push to it,
# mmdebstrap for Debian images; umoci only for the comparison in scripts/bench-images.sh.
command -v docker-registry >/dev/null 2>&1 || need_pkgs+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need_pkgs+=(skopeo)
command -v htpasswd >/dev/null 2>&1 || need_pkgs+=(apache2-utils)
command -v mmdebstrap >/dev/null 2>&1 || need_pkgs+=(mmdebstrap)
command -v umoci >/dev/null 2>&1 || need_pkgs+=(umoci)
command -v containerd >/dev/null 2>&1 || need_pkgs+=(containerd)   # the containerd shim tests (containerd-shim-capsa)
command -v chromium >/dev/null 2>&1 || need_pkgs+=(chromium)   # the screen viewer's browser test (capsa screen view)
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)   # the shim's CRI test client compiles its protos (k8s-cri)
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need_pkgs+=(python3 python3-venv)
fi

if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "capsa setup: installing missing packages: ${need_pkgs[*]}" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "capsa setup: not root and no sudo; install them yourself: apt-get install ${need_pkgs[*]}" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # Never remove a package the user has (e.g. a newer qemu-utils from
  # backports that Debian's qemu-system-x86 conflicts with): say so instead.
  if ! $SUDO apt-get install -y -qq --no-install-recommends --no-remove "${need_pkgs[@]}" >&2; then
    echo "capsa setup: apt cannot install ${need_pkgs[*]} without removing packages you have:" >&2
    LC_ALL=C apt-get install -s --no-install-recommends "${need_pkgs[@]}" 2>/dev/null \
      | awk '/^Remv/ {print "  would remove: " $2 " " $3}' >&2 || true
    echo "capsa setup: nothing was changed. Fix: install matching versions yourself, e.g." >&2
    echo "  apt-get install -t <the suite your installed qemu packages come from> ${need_pkgs[*]}" >&2
    echo "  or accept the replacement: apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "capsa setup: cargo not found; install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi
