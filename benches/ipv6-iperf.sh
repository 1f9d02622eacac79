#!/usr/bin/env bash
# iperf3 TCP between two TCG guests over IPv6 against IPv4 (the reference), alternating in the
# same run with the same guests, so the machine's noise falls on both alike: first through one
# vunet network, then through a Linux bridge with two taps (QEMU's own virtio-net) in a network
# namespace this script creates, where the same guests show what the guests' own IPv6 stack
# costs. Prints each pair, the ratio IPv6/IPv4 on each, and vunet/bridge per family. Traffic
# stays between the two guests (an isolated network; nothing leaves it).
#
# Usage: benches/ipv6-iperf.sh [SECONDS] [ROUNDS]   (default 10 s, 2 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-2}
work=$(mktemp -d)
ns=vunetv6b$$
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
. benches/common.sh

qemu() { # name netdev-args mac [prefix...]
  local name=$1 netdev=$2 mac=$3
  shift 3
  "$@" qemu-system-x86_64 -accel tcg -machine memory-backend=mem -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel guest/vmlinuz -initrd "$work/$name/initrd.gz" \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    $netdev -device virtio-net-pci,netdev=n0,mac="$mac",romfile=,vectors=0 \
    -append 'console=ttyS0 quiet panic=-1 no_timer_check' < /dev/null > "$work/$name.console" 2>&1 &
}

# The same static addresses on both paths (vunet's port security takes them first come).
up6='i=0; until ip -6 addr show dev eth0 scope global | grep -v tentative | grep -q "inet6 fd00:7675:1::"; do i=$((i+1)); [ $i -gt 300 ] && exit 3; sleep 0.2; done'
server_script="ip addr add 10.0.0.1/24 dev eth0; ip -6 addr add fd00:7675:1::11/64 dev eth0; $up6; iperf3 -s >/dev/null"
client_script="ip addr add 10.0.0.2/24 dev eth0; ip -6 addr add fd00:7675:1::12/64 dev eth0; $up6
until ping -c 1 -W 1 10.0.0.1 >/dev/null 2>&1; do sleep 0.5; done
until ping6 -c 1 -W 1 fd00:7675:1::11 >/dev/null 2>&1; do sleep 0.5; done
for r in \$(seq $rounds); do
  for fam in 4 6; do
    if [ \$fam = 4 ]; then dst=10.0.0.1; else dst=fd00:7675:1::11; fi
    until iperf3 -\$fam -c \$dst -t $secs -J > /tmp/r.json; do sleep 1; done
    echo IPERF-\$fam-BEGIN; cat /tmp/r.json; echo IPERF-\$fam-END
  done
done"
wait_done() {
  for _ in $(seq $(( (secs + 15) * 2 * rounds + 150 ))); do grep -q VUNET-TEST-EXIT "$1" 2>/dev/null && return 0; sleep 1; done
  echo "the client guest did not finish; its console:" >&2; tail -20 "$1" >&2; exit 1
}

run_vunet() {
  cat > "$work/vunet.toml" <<TOML
[[network]]
name = "v6bench"
mode = "isolated"
gateway = "10.0.0.254/24"
gateway6 = "fd00:7675:1::1/64"
[[network.port]]
name = "vm1"
socket = "$work/vm1.sock"
[[network.port]]
name = "vm2"
socket = "$work/vm2.sock"
TOML
  target/release/vunet run --config "$work/vunet.toml" > "$work/vunet.out" 2> "$work/vunet.log" &
  local vpid=$!
  for _ in $(seq 50); do [ -S "$work/vm2.sock" ] && break; sleep 0.1; done
  initrd vs "$server_script"; initrd vc "$client_script"
  qemu vs "-chardev socket,id=c0,path=$work/vm1.sock -netdev vhost-user,id=n0,chardev=c0" 52:54:00:00:00:01
  local spid=$!
  qemu vc "-chardev socket,id=c0,path=$work/vm2.sock -netdev vhost-user,id=n0,chardev=c0" 52:54:00:00:00:02
  wait_done "$work/vc.console"
  kill $spid $vpid; wait $spid $vpid 2>/dev/null || true
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
  local spid=$!
  qemu bc "-netdev tap,id=n0,ifname=tap1,script=no,downscript=no" 52:54:00:00:00:02 ip netns exec "$ns"
  wait_done "$work/bc.console"
  kill $spid; wait $spid 2>/dev/null || true
  ip netns del "$ns"
}

run_vunet
run_bridge
echo "iperf3 TCP between two TCG guests (1 vCPU, 512 MiB each), ${secs} s each, $(nproc) cores, $(date -u +%F)"
python3 - "$work/vc.console" "$work/bc.console" <<'PY'
import json, re, sys
def rates(path):
    text = open(path, errors="replace").read().replace("\r", "")
    r = {"4": [], "6": []}
    for fam, body in re.findall(r"IPERF-([46])-BEGIN\n(.*?)IPERF-[46]-END", text, re.S):
        r[fam].append(json.loads(body)["end"]["sum_received"]["bits_per_second"] / 1e9)
    return r
for name, path in (("vunet", sys.argv[1]), ("Linux bridge + taps", sys.argv[2])):
    r = rates(path)
    for i, (v4, v6) in enumerate(zip(r["4"], r["6"]), 1):
        print(f"{name}, round {i}: IPv4 {v4:.3f} Gbit/s, IPv6 {v6:.3f} Gbit/s, IPv6/IPv4 = {v6 / v4:.2f}")
    print(f"{name}: IPv6/IPv4 over all rounds = {sum(r['6']) / sum(r['4']):.2f}")
v, b = rates(sys.argv[1]), rates(sys.argv[2])
for fam in "46":
    print(f"IPv{fam}: vunet/bridge = {sum(v[fam]) / sum(b[fam]):.2f}")
PY
