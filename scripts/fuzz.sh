#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz / libFuzzer, on the stable toolchain through
# RUSTC_BOOTSTRAP=1) of the DHCP and DNS parsers, the DHCP server, the lease file, the
# gateway's and the routers' (IPv4 and IPv6) frame handling, the vhost-user relay (the VMM's messages and
# descriptors), the split-ring walker (a guest's descriptor tables and ring indices) and the
# socket-NAT TCP splice (outbound and inbound flows) and UDP and ICMP tables, and the
# gateway's IPv6 neighbour discovery and echo, and VXLAN decapsulation with its learning table.
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 20).
# Installs cargo-fuzz from crates.io if it is missing. Seeds are in tests/fuzz/seeds/ (kept in
# git); what the fuzzer finds stays in tests/fuzz/corpus/ (not kept).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
cd tests/fuzz
for t in dhcp_server dhcpv6 dns_query gateway_frame lease_file router_frame router6_frame vhost_relay split_ring socknat_tcp ipv6_nd vxlan_datagram gro_batch; do
  mkdir -p corpus/$t
  echo "== fuzz $t for ${secs}s"
  log=$(mktemp)
  if ! cargo fuzz run --fuzz-dir . "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$secs" -max_len=2048 > "$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t FAILED (crash input in tests/fuzz/artifacts/$t/)"
    exit 1
  fi
  grep -E "DONE|^Done" "$log" | tail -2
  rm -f "$log"
done
