#!/usr/bin/env bash
# iperf3 TCP from one TCG guest to a server on the "LAN", through each vunet uplink kind and, in
# the same run, through the reference path: the guest on a tap in a Linux bridge with the LAN's
# veth (QEMU's own virtio-net, no vhost-net). Prints each figure and its ratio to the bridge.
# The LAN is a namespace this script creates (10.9.0.1/24, iperf3 -s), joined by a veth pair
# to a second namespace where vunet (or the bridge) runs; both are deleted at the end.
#
# Usage: benches/uplink-iperf.sh [SECONDS] [ROUNDS]   (default 10 s, 1 round)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-1}
scripts/install-deps.sh
scripts/build-guest.sh
cargo build --release -p vunet >&2
work=$(mktemp -d)
h=vuuplh$$
l=vuupll$$
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$h" 2>/dev/null || true
  ip netns del "$l" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

initrd() { # name script
  mkdir -p "$work/$1/add"
  printf '%s\n' "$2" > "$work/$1/add/test.sh"
  (cd "$work/$1/add" && echo test.sh | cpio -o -H newc --quiet | gzip -1) | cat guest/initramfs.gz - > "$work/$1/initrd.gz"
}
qemu() { # name netdev-args [prefix...]
  local name=$1 netdev=$2
  shift 2
  "$@" qemu-system-x86_64 -accel tcg -machine memory-backend=mem -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel guest/vmlinuz -initrd "$work/$name/initrd.gz" \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    $netdev -device virtio-net-pci,netdev=n0,mac=52:54:00:09:00:02,romfile=,vectors=0 \
    -append 'console=ttyS0 quiet panic=-1 no_timer_check' < /dev/null > "$work/$name.console" 2>&1 &
}
client_script="ip addr add 10.9.0.2/24 dev eth0; sleep 2; ping -c 2 -W 5 10.9.0.1 >/dev/null; iperf3 -c 10.9.0.1 -t $secs -J > /tmp/r.json; echo IPERF-JSON-BEGIN; cat /tmp/r.json; echo IPERF-JSON-END"
rate() { # console file -> Gbit/s
  sed -n '/IPERF-JSON-BEGIN/,/IPERF-JSON-END/p' "$1" | sed '1d;$d' | tr -d '\r' | python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
wait_done() { for _ in $(seq $((secs + 90))); do grep -q VUNET-TEST-EXIT "$1" 2>/dev/null && return 0; sleep 1; done; return 1; }

lan_up() {
  ip netns add "$h"; ip netns add "$l"
  ip -n "$h" link set lo up; ip -n "$l" link set lo up
  ip link add up0 netns "$h" type veth peer name lan0 netns "$l"
  ip -n "$h" link set up0 up; ip -n "$l" link set lan0 up
  ip -n "$l" addr add 10.9.0.1/24 dev lan0
  ip netns exec "$l" iperf3 -s > /dev/null 2>&1 &
  sleep 0.5
}
lan_down() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$h"; ip netns del "$l"
}

run_vunet() { # uplink kind
  lan_up
  cat > "$work/vunet.toml" <<TOML
[[network]]
name = "lan"
mode = "bridge"
[network.uplink]
kind = "$1"
interface = "up0"
[[network.port]]
name = "vm1"
socket = "$work/vm1.sock"
TOML
  ip netns exec "$h" target/release/vunet run --config "$work/vunet.toml" > "$work/vunet.out" 2> "$work/vunet-$1.log" &
  for _ in $(seq 50); do [ -S "$work/vm1.sock" ] && break; sleep 0.1; done
  initrd "c-$1" "$client_script"
  qemu "c-$1" "-chardev socket,id=c0,path=$work/vm1.sock -netdev vhost-user,id=n0,chardev=c0"
  wait_done "$work/c-$1.console"
  rate "$work/c-$1.console"
  lan_down
}

run_bridge() {
  lan_up
  ip -n "$h" link add br0 type bridge
  ip -n "$h" link set up0 master br0
  ip -n "$h" tuntap add dev tap0 mode tap
  ip -n "$h" link set tap0 master br0
  ip -n "$h" link set tap0 up
  ip -n "$h" link set br0 up
  initrd c-bridge "$client_script"
  qemu c-bridge "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no" ip netns exec "$h"
  wait_done "$work/c-bridge.console"
  rate "$work/c-bridge.console"
  lan_down
}

echo "iperf3 TCP, TCG guest (1 vCPU, 512 MiB) -> LAN namespace over veth, ${secs} s, $(nproc) cores, $(date -u +%F)"
for r in $(seq "$rounds"); do
  a=$(run_vunet af-packet)
  m=$(run_vunet macvtap)
  b=$(run_bridge)
  python3 -c "
a, m, b = float('$a'), float('$m'), float('$b')
print('round $r: af-packet %.3f Gbit/s (%.2fx), macvtap %.3f Gbit/s (%.2fx), Linux bridge + tap %.3f Gbit/s (1.00x)' % (a, a / b, m, m / b, b))"
done
