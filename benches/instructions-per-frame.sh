#!/usr/bin/env bash
# Instructions vunet's data path executes per 64-byte frame, counted by callgrind while DPDK's
# virtio-user frontend loops frames through it (the same loop as dpdk-virtio-user.sh: two
# ports, mac forwarding). A packet rate on this shared machine moves by a third from one run
# to the next; this count moves by a few percent (bursts are not always the same length), so
# a change of 10 % in the per-frame work shows. It does not see cache misses or stalls: the
# packet rate (dpdk-virtio-user.sh) stays the measure of the target.
#
# Counted: everything under `tx_burst` (taking, switching, delivering and completing a burst of
# frames), divided by the frames the frontend received back. With a second binary (e.g. built
# from an older commit), it is counted the same way in the same run, and the ratio printed.
#
# Usage: benches/instructions-per-frame.sh [SECONDS] [OTHER_VUNET_BINARY]
# Needs dpdk-testpmd and valgrind (scripts/install-deps.sh --bench).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
other=${2:-}
scripts/install-deps.sh --bench
cargo build --release -p vunet >&2
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

{
  printf '[[network]]\nname = "bench"\nmode = "bridge"\n'
  for p in p0 p1; do printf '[[network.port]]\nname = "%s"\nsocket = "%s/%s.sock"\n' "$p" "$work" "$p"; done
} > "$work/vunet.toml"

count() { # binary -> "instructions_per_frame frames"
  rm -f "$work"/p*.sock "$work/cg.out"
  taskset -c 1 valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$1" run --config "$work/vunet.toml" \
    > "$work/vunet.out" 2> "$work/vunet.log" &
  local pid=$!
  for _ in $(seq 300); do [ -S "$work/p1.sock" ] && break; sleep 0.1; done
  [ -S "$work/p1.sock" ] || { echo "vunet under valgrind made no sockets in 30 s" >&2; return 1; }
  (sleep "$secs"; echo) | timeout $((secs + 20)) dpdk-testpmd --lcores '0@1,1@0' --no-pci --no-huge -m 1024 \
      --single-file-segments --file-prefix "vunetipf$$" \
      --vdev "net_virtio_user0,path=$work/p0.sock,queues=1,queue_size=1024,mac=02:00:00:00:00:00" \
      --vdev "net_virtio_user1,path=$work/p1.sock,queues=1,queue_size=1024,mac=02:00:00:00:00:01" \
      -- --forward-mode=mac --eth-peer=0,02:00:00:00:00:01 --eth-peer=1,02:00:00:00:00:00 \
      --rxq=1 --txq=1 --auto-start --tx-first --nb-cores=1 --stats-period=5 --total-num-mbufs=16384 \
      > "$work/frontend.log" 2>&1 || true
  kill -INT "$pid"
  wait "$pid" 2>/dev/null || true
  # The totals over both ports, printed when testpmd stops.
  local frames ir
  frames=$(grep "RX-total" "$work/frontend.log" | tail -1 | awk '{print $NF}')
  ir=$(callgrind_annotate --inclusive=yes "$work/cg.out" 2>/dev/null | grep 'switch::tx_burst \[' | head -1 | awk '{gsub(",", "", $1); print $1}')
  awk -v i="${ir:-0}" -v f="${frames:-0}" 'BEGIN { printf "%.0f %d\n", (f > 0) ? i / f : 0, f }'
}

echo "callgrind, dpdk-testpmd virtio-user (mac forwarding, 64 B) through vunet, ${secs} s, $(date -u +%F)"
read -r a fa <<< "$(count target/release/vunet)"
printf '  %-24s %6d instructions per frame (%d frames)\n' vunet "$a" "$fa"
if [ -n "$other" ]; then
  read -r b fb <<< "$(count "$other")"
  printf '  %-24s %6d instructions per frame (%d frames)\n' "$(basename "$other")" "$b" "$fb"
  awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "  vunet executes %.2fx the instructions per frame of %s\n", a / b, "'"$(basename "$other")"'" }'
fi
