#!/usr/bin/env bash
# The test command: host set-up (only what is missing), then every test,
# including the ones that boot real VMs under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "capsa test: installing cargo-nextest from crates.io" >&2
  cargo install cargo-nextest --locked
fi
# Build the default guest bundle once up front (fetches a Debian kernel on first
# use), so concurrently starting tests find it cached instead of racing for it.
cargo build --workspace --locked
./target/debug/capsa image build >/dev/null
exec cargo nextest run --workspace --locked "$@"
