#!/usr/bin/env bash
# iperf3 TCP between two TCG guests on two "hosts" joined by VXLAN (VNI 42), in the same run:
#  - vunet: one vunet daemon per host, each guest on a vhost-user port, a vxlan uplink each;
#  - reference: each guest on a tap in a Linux bridge with a kernel vxlan device (QEMU's own
#    virtio-net, no vhost-net), the same namespaces and underlay.
# The hosts are namespaces this script creates (10.0.0.1 and 10.0.0.2 on a veth pair, MTU
# 1500; guests 192.168.42.1 and .2 with MTU 1450); they are deleted at the end. Prints each
# figure and vunet's ratio to the kernel's (issue 16's target: >= 1.0x).
#
# Usage: benches/vxlan-iperf.sh [SECONDS] [ROUNDS]   (default 10 s, 1 round)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-1}
work=$(mktemp -d)
h1=vuvx1h$$
h2=vuvx2h$$
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$h1" 2>/dev/null || true
  ip netns del "$h2" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
. benches/common.sh

qemu() { # name mac netdev-args [prefix...]
  local name=$1 mac=$2 netdev=$3
  shift 3
  "$@" qemu-system-x86_64 -accel tcg -machine memory-backend=mem -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel guest/vmlinuz -initrd "$work/$name/initrd.gz" \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    $netdev -device virtio-net-pci,netdev=n0,mac="$mac",host_mtu=1450,romfile=,vectors=0 \
    -append 'console=ttyS0 quiet panic=-1 no_timer_check' < /dev/null > "$work/$name.console" 2>&1 &
}
# The server guest serves one test and exits; the client waits for it, then measures.
server_script="ip addr add 192.168.42.2/24 dev eth0; ip link set eth0 up; iperf3 -s -1 > /dev/null"
client_script="ip addr add 192.168.42.1/24 dev eth0; ip link set eth0 up; i=0; until ping -c 1 -W 1 192.168.42.2 >/dev/null 2>&1; do i=\$((i+1)); [ \$i -gt 200 ] && exit 8; sleep 0.5; done; sleep 1; iperf3 -c 192.168.42.2 -t $secs -J > /tmp/r.json; echo IPERF-JSON-BEGIN; cat /tmp/r.json; echo IPERF-JSON-END"
rate() { # console file -> Gbit/s
  sed -n '/IPERF-JSON-BEGIN/,/IPERF-JSON-END/p' "$1" | sed '1d;$d' | tr -d '\r' | python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
wait_done() { for _ in $(seq $((secs + 180))); do grep -q VUNET-TEST-EXIT "$1" 2>/dev/null && return 0; sleep 1; done; return 1; }

hosts_up() {
  ip netns add "$h1"; ip netns add "$h2"
  ip -n "$h1" link set lo up; ip -n "$h2" link set lo up
  ip link add ul0 netns "$h1" type veth peer name ul0 netns "$h2"
  ip -n "$h1" link set ul0 up; ip -n "$h2" link set ul0 up
  ip -n "$h1" addr add 10.0.0.1/24 dev ul0
  ip -n "$h2" addr add 10.0.0.2/24 dev ul0
}
hosts_down() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$h1"; ip netns del "$h2"
}

run_vunet() {
  hosts_up
  for i in 1 2; do
    local ns local remote
    if [ $i = 1 ]; then ns=$h1 local=10.0.0.1 remote=10.0.0.2; else ns=$h2 local=10.0.0.2 remote=10.0.0.1; fi
    mkdir -p "$work/v$i"
    cat > "$work/v$i/vunet.toml" <<TOML
[[network]]
name = "vx"
mode = "bridge"
[network.uplink]
kind = "vxlan"
vni = 42
local = "$local"
remotes = ["$remote"]
[[network.port]]
name = "vm"
socket = "$work/v$i/vm.sock"
TOML
    ip netns exec "$ns" target/release/vunet run --config "$work/v$i/vunet.toml" > "$work/v$i/vunet.out" 2> "$work/v$i/vunet.log" &
    for _ in $(seq 50); do [ -S "$work/v$i/vm.sock" ] && break; sleep 0.1; done
  done
  initrd s-vunet "$server_script"
  initrd c-vunet "$client_script"
  qemu s-vunet 52:54:00:00:42:02 "-chardev socket,id=c0,path=$work/v2/vm.sock -netdev vhost-user,id=n0,chardev=c0"
  qemu c-vunet 52:54:00:00:42:01 "-chardev socket,id=c0,path=$work/v1/vm.sock -netdev vhost-user,id=n0,chardev=c0"
  wait_done "$work/c-vunet.console"
  rate "$work/c-vunet.console"
  hosts_down
}

run_kernel() {
  hosts_up
  for i in 1 2; do
    local ns local remote
    if [ $i = 1 ]; then ns=$h1 local=10.0.0.1 remote=10.0.0.2; else ns=$h2 local=10.0.0.2 remote=10.0.0.1; fi
    ip -n "$ns" link add vx0 type vxlan id 42 dstport 4789 local "$local" remote "$remote" dev ul0
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" link set vx0 master br0
    ip -n "$ns" tuntap add dev tap0 mode tap
    ip -n "$ns" link set tap0 master br0
    ip -n "$ns" link set tap0 up
    ip -n "$ns" link set vx0 up
    ip -n "$ns" link set br0 up
  done
  initrd s-kernel "$server_script"
  initrd c-kernel "$client_script"
  qemu s-kernel 52:54:00:00:42:02 "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no" ip netns exec "$h2"
  qemu c-kernel 52:54:00:00:42:01 "-netdev tap,id=n0,ifname=tap0,script=no,downscript=no" ip netns exec "$h1"
  wait_done "$work/c-kernel.console"
  rate "$work/c-kernel.console"
  hosts_down
}

echo "iperf3 TCP between two TCG guests (1 vCPU, 512 MiB each) across VXLAN over a veth, ${secs} s, $(nproc) cores, $(date -u +%F)"
for r in $(seq "$rounds"); do
  v=$(run_vunet)
  k=$(run_kernel)
  python3 -c "
v, k = float('$v'), float('$k')
print('round $r: vunet vxlan uplinks %.3f Gbit/s (%.2fx), kernel vxlan + bridge + tap %.3f Gbit/s (1.00x)' % (v, v / k, k))"
done
