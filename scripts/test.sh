#!/usr/bin/env bash
# Runs every test of vunet: unit tests, the vhost-user frontend-driver tests, the CLI tests and
# the QEMU guest tests. Installs what the tests need (Debian packages, the guest image) first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build-guest.sh
cargo build --workspace --all-targets
cargo test --workspace
