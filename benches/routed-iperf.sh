#!/usr/bin/env bash
# iperf3 TCP from one TCG guest to a server on the "LAN" through vunet's router, in `nat` and
# `route` mode, against the same guest through a `bridge` network on the same af-packet uplink
# (the reference, measured in the same run). Then short TCP connections per second from the
# guest to a LAN server through NAT, next to the same loop bridged. Then the route-mode network
# over IPv6 (the guest prefix fd00:7675:1::/64 routed by the LAN via the uplink's address6),
# against the IPv4 route figure of the same round. The LAN is a namespace this script creates
# (10.9.0.1/24 and fd00:9::1/64: iperf3 -s, a busybox nc server), joined by a veth pair to the
# namespace vunet runs in; both are deleted at the end.
#
# Usage: benches/routed-iperf.sh [SECONDS] [ROUNDS]   (default 10 s, 1 round)
#        ROUTED_IPV6_ONLY=1 benches/routed-iperf.sh ...   (route over IPv4 and IPv6 only)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-1}
scripts/install-deps.sh
scripts/build-guest.sh
cargo build --release -p vunet >&2
work=$(mktemp -d)
h=vurth$$
l=vurtl$$
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$h" 2>/dev/null || true
  ip netns del "$l" 2>/dev/null || true
  [ -n "${KEEP_WORK:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT

initrd() { # name script
  mkdir -p "$work/$1/add"
  printf '%s\n' "$2" > "$work/$1/add/test.sh"
  (cd "$work/$1/add" && echo test.sh | cpio -o -H newc --quiet | gzip -1) | cat guest/initramfs.gz - > "$work/$1/initrd.gz"
}
qemu() { # name
  qemu-system-x86_64 -accel tcg -machine memory-backend=mem -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel guest/vmlinuz -initrd "$work/$1/initrd.gz" \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -chardev socket,id=c0,path="$work/vm1.sock" -netdev vhost-user,id=n0,chardev=c0 \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:09:00:02,romfile=,vectors=0 \
    -append 'console=ttyS0 quiet panic=-1 no_timer_check' < /dev/null > "$work/$1.console" 2>&1 &
}
# The guest: address, iperf3 for $secs, then 5 s of short TCP connections (nc, one line each).
client_script() { # address/prefix default-route
  echo "ip addr add $1 dev eth0; ip route add default via $2; sleep 2; ping -c 2 -W 5 10.9.0.1 >/dev/null
iperf3 -c 10.9.0.1 -t $secs -J > /tmp/r.json; echo IPERF-JSON-BEGIN; cat /tmp/r.json; echo IPERF-JSON-END
n=0; end=\$((\$(date +%s) + 5)); while [ \$(date +%s) -lt \$end ]; do echo x | nc -w 2 10.9.0.1 9000 > /dev/null && n=\$((n + 1)); done; echo \"CONNS \$n\""
}
# The same over IPv6: a static address in the guest prefix, the default route from vunet's RA.
client6_script() {
  echo "ip -6 addr add fd00:7675:1::10/64 dev eth0
i=0; until ip -6 route | grep -q '^default' && ! ip -6 addr show dev eth0 | grep -q tentative; do i=\$((i+1)); [ \$i -gt 300 ] && exit 3; sleep 0.2; done
until ping6 -c 1 -W 1 fd00:9::1 >/dev/null 2>&1; do sleep 0.5; done
iperf3 -6 -c fd00:9::1 -t $secs -J > /tmp/r.json; echo IPERF-JSON-BEGIN; cat /tmp/r.json; echo IPERF-JSON-END
n=0; end=\$((\$(date +%s) + 5)); while [ \$(date +%s) -lt \$end ]; do echo x | nc -w 2 fd00:9::1 9000 > /dev/null && n=\$((n + 1)); done; echo \"CONNS \$n\""
}
rate() { # console file -> Gbit/s
  sed -n '/IPERF-JSON-BEGIN/,/IPERF-JSON-END/p' "$1" | sed '1d;$d' | tr -d '\r' | python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
conns() { grep -a 'CONNS ' "$1" | tr -d '\r' | awk '{print $2 / 5}'; }
wait_done() { for _ in $(seq $((secs + 120))); do grep -q VUNET-TEST-EXIT "$1" 2>/dev/null && return 0; sleep 1; done; return 1; }

lan_up() {
  ip netns add "$h"; ip netns add "$l"
  ip -n "$h" link set lo up; ip -n "$l" link set lo up
  ip link add up0 netns "$h" type veth peer name lan0 netns "$l"
  ip -n "$h" link set up0 up; ip -n "$l" link set lan0 up
  ip -n "$l" addr add 10.9.0.1/24 dev lan0
  ip -n "$l" addr add fd00:9::1/64 dev lan0 nodad
  ip netns exec "$l" iperf3 -s > /dev/null 2>&1 &
  ip netns exec "$l" busybox nc -ll -p 9000 -e cat > /dev/null 2>&1 &
  sleep 0.5
}
lan_down() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$h"; ip netns del "$l"
}

run() { # mode -> "Gbit/s conns/s"
  lan_up
  rm -f "$work/vm1.sock"
  case $1 in
    bridge)
      printf '[[network]]\nname = "lan"\nmode = "bridge"\n[network.uplink]\nkind = "af-packet"\ninterface = "up0"\n' > "$work/vunet.toml"
      initrd "c-$1" "$(client_script 10.9.0.2/24 10.9.0.1)" ;;
    nat|route)
      printf '[[network]]\nname = "r"\nmode = "%s"\ngateway = "192.168.122.1/24"\n[network.uplink]\nkind = "af-packet"\ninterface = "up0"\naddress = "10.9.0.50/24"\nrouter = "10.9.0.1"\n' "$1" > "$work/vunet.toml"
      [ "$1" = route ] && ip -n "$l" route add 192.168.122.0/24 via 10.9.0.50
      initrd "c-$1" "$(client_script 192.168.122.10/24 192.168.122.1)" ;;
    route6)
      printf '[[network]]\nname = "r"\nmode = "route"\ngateway = "192.168.122.1/24"\ngateway6 = "fd00:7675:1::1/64"\n[network.uplink]\nkind = "af-packet"\ninterface = "up0"\naddress = "10.9.0.50/24"\nrouter = "10.9.0.1"\naddress6 = "fd00:9::50/64"\nrouter6 = "fd00:9::1"\n' > "$work/vunet.toml"
      ip -n "$l" -6 route add fd00:7675:1::/64 via fd00:9::50
      initrd "c-$1" "$(client6_script)" ;;
  esac
  printf '[[network.port]]\nname = "vm1"\nsocket = "%s/vm1.sock"\nport_security = false\n' "$work" >> "$work/vunet.toml"
  ip netns exec "$h" target/release/vunet run --config "$work/vunet.toml" > "$work/vunet.out" 2> "$work/vunet-$1.log" &
  for _ in $(seq 50); do [ -S "$work/vm1.sock" ] && break; sleep 0.1; done
  qemu "c-$1"
  wait_done "$work/c-$1.console"
  # Kept per run for KEEP_WORK=1 (each round overwrites the mode's files).
  local t; t=$(date +%s%N)
  cp "$work/c-$1.console" "$work/run-$1-$t.console"; cp "$work/vunet-$1.log" "$work/run-$1-$t.log"
  echo "$(rate "$work/c-$1.console") $(conns "$work/c-$1.console")"
  lan_down
}

echo "iperf3 TCP, TCG guest (1 vCPU, 512 MiB) -> LAN namespace over veth (af-packet uplink), ${secs} s, $(nproc) cores, $(date -u +%F)"
if [ "${ROUTED_IPV6_ONLY:-}" = 1 ]; then
  # Only route over IPv4 and over IPv6, alternating: the IPv6 ratio with less noise per round.
  for r in $(seq "$rounds"); do
    read -r rg rc <<< "$(run route)"
    read -r r6g r6c <<< "$(run route6)"
    echo "round $r: route over IPv4 $rg Gbit/s, over IPv6 $r6g Gbit/s"
    echo "$rg $r6g" >> "$work/pairs"
  done
  awk '{a += $1; b += $2} END {printf "route over IPv6 / over IPv4, all rounds: %.2f\n", b / a}' "$work/pairs"
  exit 0
fi
for r in $(seq "$rounds"); do
  read -r bg bc <<< "$(run bridge)"
  read -r ng nc <<< "$(run nat)"
  read -r rg rc <<< "$(run route)"
  read -r r6g r6c <<< "$(run route6)"
  python3 -c "
b, n, r, r6 = float('$bg'), float('$ng'), float('$rg'), float('$r6g')
bc, nc, rc, r6c = float('$bc'), float('$nc'), float('$rc'), float('$r6c')
print('round $r: nat %.3f Gbit/s (%.2fx), route %.3f Gbit/s (%.2fx), bridge %.3f Gbit/s (1.00x); short TCP connections/s: nat %.1f, bridge %.1f (%.2fx)' % (n, n / b, r, r / b, b, nc, bc, nc / bc if bc else 0))
print('round $r: route over IPv6 %.3f Gbit/s = %.2fx route over IPv4; short TCP connections/s over IPv6 %.1f = %.2fx IPv4' % (r6, r6 / r, r6c, r6c / rc if rc else 0))"
done
