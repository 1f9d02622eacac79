#!/usr/bin/env bash
# iperf3 TCP between two TCG guests, through vunet and, in the same run, through a Linux bridge
# with two taps (QEMU's own virtio-net, no vhost-net), both with vectors=0 so the guests' NICs
# are configured alike. Prints each figure and the ratio. All traffic stays between the two
# guests: the bridge and taps live in a network namespace this script creates and deletes.
#
# Usage: benches/guest-iperf.sh [SECONDS] [ROUNDS]   (default 10 s, 1 round each, alternating)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-1}
scripts/install-deps.sh
scripts/build-guest.sh
cargo build --release -p vunet >&2
work=$(mktemp -d)
ns=vunetbench$$
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

initrd() { # name script
  mkdir -p "$work/$1/add"
  printf '%s\n' "$2" > "$work/$1/add/test.sh"
  (cd "$work/$1/add" && echo test.sh | cpio -o -H newc --quiet | gzip -1) | cat guest/initramfs.gz - > "$work/$1/initrd.gz"
}
qemu() { # name netdev-args mac [prefix...]
  local name=$1 netdev=$2 mac=$3
  shift 3
  "$@" qemu-system-x86_64 -accel tcg -machine memory-backend=mem -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel guest/vmlinuz -initrd "$work/$name/initrd.gz" \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    $netdev -device virtio-net-pci,netdev=n0,mac="$mac",romfile=,vectors=0 \
    -append 'console=ttyS0 quiet panic=-1 no_timer_check' < /dev/null > "$work/$name.console" 2>&1 &
}
server_script='ip addr add 10.0.0.1/24 dev eth0; iperf3 -s -1 >/dev/null'
client_script="ip addr add 10.0.0.2/24 dev eth0; sleep 2; ping -c 2 -W 5 10.0.0.1 >/dev/null; iperf3 -c 10.0.0.1 -t $secs -J > /tmp/r.json; echo IPERF-JSON-BEGIN; cat /tmp/r.json; echo IPERF-JSON-END"
rate() { # console file -> Gbit/s
  sed -n '/IPERF-JSON-BEGIN/,/IPERF-JSON-END/p' "$1" | sed '1d;$d' | tr -d '\r' | python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
wait_done() { for _ in $(seq $((secs + 90))); do grep -q VUNET-TEST-EXIT "$1" 2>/dev/null && return 0; sleep 1; done; return 1; }

run_vunet() {
  mkdir -p "$work/rt"
  target/release/vunet run --runtime-dir "$work/rt" > "$work/vunet.out" 2> "$work/vunet.log" &
  local vpid=$!
  for _ in $(seq 50); do [ -S "$work/rt/vm2.sock" ] && break; sleep 0.1; done
  initrd vs "$server_script"; initrd vc "$client_script"
  qemu vs "-chardev socket,id=c0,path=$work/rt/vm1.sock -netdev vhost-user,id=n0,chardev=c0" 52:54:00:00:00:01
  qemu vc "-chardev socket,id=c0,path=$work/rt/vm2.sock -netdev vhost-user,id=n0,chardev=c0" 52:54:00:00:00:02
  wait_done "$work/vc.console"
  rate "$work/vc.console"
  sleep 1
  kill $vpid; wait $vpid 2>/dev/null || true
}

run_bridge() {
  ip netns add "$ns"
  ip -n "$ns" link add br0 type bridge
  ip -n "$ns" link set br0 up
  for t in tap0 tap1; do
    ip -n "$ns" tuntap add dev $t mode tap
    ip -n "$ns" link set $t master br0
    ip -n "$ns" link set $t up
  done
  initrd bs "$server_script"; initrd bc "$client_script"
  qemu bs "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no" 52:54:00:00:00:01 ip netns exec "$ns"
  qemu bc "-netdev tap,id=n0,ifname=tap1,script=no,downscript=no" 52:54:00:00:00:02 ip netns exec "$ns"
  wait_done "$work/bc.console"
  rate "$work/bc.console"
  sleep 1
  ip netns del "$ns"
}

echo "iperf3 TCP, two TCG guests (1 vCPU, 512 MiB each), ${secs} s, $(nproc) cores, $(date -u +%F)"
for r in $(seq "$rounds"); do
  v=$(run_vunet)
  b=$(run_bridge)
  python3 -c "print('round $r: vunet %s Gbit/s, Linux bridge + taps %s Gbit/s, ratio vunet/bridge = %.2f' % ('$v', '$b', float('$v')/float('$b')))"
done
