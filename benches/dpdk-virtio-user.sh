#!/usr/bin/env bash
# 64-byte packet rate through vunet with DPDK's own virtio-user frontend: dpdk-testpmd with two
# net_virtio_user ports on two vunet ports of a bridge network, mac forwarding, frames looping
# port 0 -> vunet -> port 1 -> testpmd -> port 1 -> vunet -> port 0 (started with --tx-first).
# Prints testpmd's Rx-pps of each port. With a second vunet binary (e.g. one built from an older
# commit) both are measured alternately in the same run, so their ratio is the result.
#
# Usage: benches/dpdk-virtio-user.sh [SECONDS] [ROUNDS] [OTHER_VUNET_BINARY]
# Needs dpdk-testpmd (scripts/install-deps.sh --bench). testpmd busy-polls one of the two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-2}
other=${3:-}
scripts/install-deps.sh --bench
cargo build --release -p vunet >&2
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
cat > "$work/vunet.toml" <<TOML
[[network]]
name = "bench"
mode = "bridge"
[[network.port]]
name = "p0"
socket = "p0.sock"
[[network.port]]
name = "p1"
socket = "p1.sock"
TOML
measure() { # vunet binary -> "port0_pps port1_pps"
  rm -f "$work"/p*.sock
  "$1" run --config "$work/vunet.toml" > "$work/vunet.out" 2> "$work/vunet.log" &
  local pid=$!
  for _ in $(seq 50); do [ -S "$work/p1.sock" ] && break; sleep 0.1; done
  (sleep "$secs"; echo) | timeout $((secs + 20)) dpdk-testpmd -l 0-1 --no-pci --no-huge -m 1024 --single-file-segments \
      --file-prefix "vunetdpdk$$" \
      --vdev "net_virtio_user0,path=$work/p0.sock,queue_size=1024,mac=02:00:00:00:00:00" \
      --vdev "net_virtio_user1,path=$work/p1.sock,queue_size=1024,mac=02:00:00:00:00:01" \
      -- --forward-mode=mac --eth-peer=0,02:00:00:00:00:01 --eth-peer=1,02:00:00:00:00:00 \
      --auto-start --tx-first --nb-cores=1 --stats-period=2 --total-num-mbufs=16384 2>&1 \
    | grep "Rx-pps" | tail -2 | awk '{print $2}' | tr '\n' ' '
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
echo "dpdk-testpmd virtio-user -> vunet, 64 B, mac forwarding, ${secs} s, $(nproc) cores, $(date -u +%F)"
for r in $(seq "$rounds"); do
  read -r a b <<< "$(measure target/release/vunet)"
  line="round $r: vunet $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.3f + %.3f = %.3f Mpps", a/1e6, b/1e6, (a+b)/1e6}')"
  if [ -n "$other" ]; then
    read -r c d <<< "$(measure "$other")"
    line="$line; $other $(awk -v a="$a" -v b="$b" -v c="$c" -v d="$d" 'BEGIN{printf "%.3f + %.3f = %.3f Mpps (this/other %.2fx)", c/1e6, d/1e6, (c+d)/1e6, (a+b)/(c+d)}')"
  fi
  echo "$line"
done
