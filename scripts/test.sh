#!/usr/bin/env bash
# Runs every test of vunet: unit tests, the vhost-user frontend-driver tests, the CLI tests and
# the QEMU guest tests, then a short fuzzing run. Installs what the tests need (Debian packages, the guest image) first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build-guest.sh
cargo build --workspace --all-targets
cargo test --workspace
# A short bounded fuzzing run of the parsers and the gateway (a longer one is in the README).
scripts/fuzz.sh "${VUNET_FUZZ_SECS:-15}"
