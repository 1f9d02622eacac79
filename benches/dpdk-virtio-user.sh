#!/usr/bin/env bash
# 64-byte packet rate with DPDK's own virtio-user frontend, vunet against DPDK's vhost PMD on
# the same sockets in the same run (issue 11's benchmark).
#
# The frontend is dpdk-testpmd with two net_virtio_user ports, mac forwarding, frames looping
# port 0 -> backend -> port 1 -> testpmd -> port 0 ... (started with --tx-first). Its forwarding
# lcore is pinned to CPU 0. The backend gets CPU 1: vunet under `taskset -c 1` (its threads
# sleep in epoll when idle), or the reference, a second testpmd with two net_vhost ports and io
# forwarding, its forwarding lcore pinned to CPU 1 (it busy-polls that core; it forwards nothing
# without --stats-period here, so it has one). Unpinned, the two
# busy-polling testpmds land on one core and the reference falls to thousands of frames/s.
#
# Each round measures, in this order: the reference, vunet (default settings: no busy polling),
# vunet with busy_poll_us = 50, then with two queue pairs the reference and vunet (`queues = 2`
# on both ports, testpmd --rxq=2 --txq=2). Printed per row: both ports' Rx-pps summed (testpmd's
# last stats period), the ratio to the reference of the same round, and for vunet its CPU time
# per million frames (from /proc/PID/stat over the last 4 s).
# With a third argument, that vunet binary (e.g. one built from an older commit) is measured
# too, default settings, right after vunet.
#
# The loop carries only what --tx-first injects: one burst per port (BURST frames, testpmd's
# default 32), so its rate depends on the round trip as well as on the cost per frame. BURST=128
# (up to 512) puts four times as many frames in flight; both testpmds (frontend and reference)
# then take bursts that long.
#
# Usage: [BURST=N] benches/dpdk-virtio-user.sh [SECONDS] [ROUNDS] [OTHER_VUNET_BINARY]
# Needs dpdk-testpmd (scripts/install-deps.sh --bench) and two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-2}
other=${3:-}
burst=${BURST:-32}
[ "$secs" -ge 6 ] || { echo "SECONDS must be at least 6" >&2; exit 2; }
scripts/install-deps.sh --bench
cargo build --release -p vunet >&2
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

config() { # extra network lines, extra port lines -> vunet.toml
  {
    printf '[[network]]\nname = "bench"\nmode = "bridge"\n%s' "$1"
    for p in p0 p1; do printf '[[network.port]]\nname = "%s"\nsocket = "%s/%s.sock"\n%s' "$p" "$work" "$p" "$2"; done
  } > "$work/vunet.toml"
}

wait_sockets() {
  for _ in $(seq 100); do [ -S "$work/p1.sock" ] && return 0; sleep 0.1; done
  echo "the backend made no sockets in 10 s" >&2
  return 1
}

# Runs the frontend for $secs seconds against whatever serves the sockets; with a backend PID,
# also that PID's CPU seconds over the last 4 s. Prints "pps cpu_seconds_per_second".
frontend() { # queues backend_pid
  local q=$1 pid=${2:-} c0=0 c1=0 t0=0 t1=0
  (sleep "$secs"; echo) | timeout $((secs + 20)) dpdk-testpmd --lcores '0@1,1@0' --no-pci --no-huge -m 1024 \
      --single-file-segments --file-prefix "vunetfe$$" \
      --vdev "net_virtio_user0,path=$work/p0.sock,queues=$q,queue_size=1024,mac=02:00:00:00:00:00" \
      --vdev "net_virtio_user1,path=$work/p1.sock,queues=$q,queue_size=1024,mac=02:00:00:00:00:01" \
      -- --forward-mode=mac --eth-peer=0,02:00:00:00:00:01 --eth-peer=1,02:00:00:00:00:00 \
      --rxq="$q" --txq="$q" --auto-start --tx-first --burst="$burst" --nb-cores=1 --stats-period=2 --total-num-mbufs=16384 \
      > "$work/frontend.log" 2>&1 &
  local fe=$!
  if [ -n "$pid" ]; then
    sleep $((secs - 5))
    c0=$(awk '{print $14 + $15}' "/proc/$pid/stat"); t0=$(date +%s.%N)
    sleep 4
    c1=$(awk '{print $14 + $15}' "/proc/$pid/stat"); t1=$(date +%s.%N)
  fi
  wait "$fe" || true
  local pps
  pps=$(grep "Rx-pps" "$work/frontend.log" | tail -2 | awk '{s += $2} END {print s + 0}')
  awk -v p="$pps" -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { printf "%d %.4f\n", p, (t1 > t0) ? (c1 - c0) / hz / (t1 - t0) : 0 }'
}

reference() { # queues -> "pps 0"
  rm -f "$work"/p*.sock
  (sleep $((secs + 8)); echo) | timeout $((secs + 25)) dpdk-testpmd --lcores '0@0,1@1' --no-pci --no-huge -m 1024 \
      --file-prefix "vunetvh$$" \
      --vdev "net_vhost0,iface=$work/p0.sock,queues=$1" --vdev "net_vhost1,iface=$work/p1.sock,queues=$1" \
      -- --forward-mode=io --rxq="$1" --txq="$1" --auto-start --burst="$burst" --nb-cores=1 --stats-period=3 --total-num-mbufs=16384 \
      > "$work/reference.log" 2>&1 &
  local be=$!
  wait_sockets
  frontend "$1"
  kill "$be" 2>/dev/null || true
  wait "$be" 2>/dev/null || true
}

vunet() { # binary queues -> "pps cpu"
  rm -f "$work"/p*.sock
  taskset -c 1 "$1" run --config "$work/vunet.toml" > "$work/vunet.out" 2> "$work/vunet.log" &
  local pid=$!
  wait_sockets
  frontend "$2" "$pid"
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

row() { # name pps cpu reference_pps
  awk -v n="$1" -v p="$2" -v c="$3" -v r="$4" 'BEGIN {
    printf "  %-28s %7.3f Mpps", n, p / 1e6
    if (r > 0) printf "  %5.2fx the reference", p / r
    if (c > 0 && p > 0) printf "  %6.0f ms CPU per million frames (%.2f cores)", c * 1e9 / p, c
    printf "\n" }'
}

echo "dpdk-testpmd virtio-user (forwarding on CPU 0) -> backend on CPU 1, 64 B, mac forwarding, bursts of $burst, ${secs} s, $(nproc) cores, $(date -u +%F)"
for r in $(seq "$rounds"); do
  echo "round $r"
  read -r ref _ <<< "$(reference 1)"
  row "DPDK vhost PMD (io fwd)" "$ref" 0 0
  config "" ""
  read -r p c <<< "$(vunet target/release/vunet 1)"
  row "vunet" "$p" "$c" "$ref"
  if [ -n "$other" ]; then
    read -r p c <<< "$(vunet "$other" 1)"
    row "$(basename "$other")" "$p" "$c" "$ref"
  fi
  config "busy_poll_us = 50"$'\n' ""
  read -r p c <<< "$(vunet target/release/vunet 1)"
  row "vunet busy_poll_us = 50" "$p" "$c" "$ref"
  read -r ref2 _ <<< "$(reference 2)"
  row "DPDK vhost PMD, 2 queues" "$ref2" 0 0
  config "" "queues = 2"$'\n'
  read -r p c <<< "$(vunet target/release/vunet 2)"
  row "vunet, 2 queue pairs" "$p" "$c" "$ref2"
done
