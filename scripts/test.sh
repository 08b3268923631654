#!/usr/bin/env bash
# The test command: host set-up (only what is missing), then every test,
# including the ones that boot real VMs under QEMU, then the API fuzzer.
#
#   scripts/test.sh [nextest args...]
#
# CAPSA_SKIP_API_FUZZ=1 skips the schemathesis run (it installs schemathesis
# from PyPI on first use and takes a few minutes).
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
# Provision the Debian package cache (python3, git) from the Debian mirror, as
# apt-get install does: the tests that build Debian images then run offline
# (a dead proxy for every request), reading only this cache.
./target/debug/capsa image build capsa-test-debs --debian bookworm --packages python3,git \
  --convert none >/dev/null
# The desktop recipe's image (Xorg, openbox, xterm; no browser) for tests/desktop.rs: built
# here from the mirror into the shared store, the test finds it there (or rebuilds it offline).
./target/debug/capsa image build capsa-test-desktop:bookworm --debian bookworm --recipe desktop \
  >/dev/null
cargo nextest run --workspace --locked "$@"
if [ "${CAPSA_SKIP_API_FUZZ:-0}" != 1 ] && [ $# -eq 0 ]; then
  echo "capsa test: fuzzing capsad's API against its OpenAPI document (scripts/api-fuzz.sh)" >&2
  CAPSA_API_FUZZ_MAX_TIME="${CAPSA_API_FUZZ_MAX_TIME:-420}" scripts/api-fuzz.sh "${CAPSA_API_FUZZ_EXAMPLES:-25}"
fi
