#!/usr/bin/env bash
# The newcomer's path in one command: `vunet run` with no configuration (network "default",
# NAT through vunet's own sockets, no root needed), two QEMU guests (TCG) on it that take DHCP
# leases from vunet's gateway and find each other by name through its DNS, fetch a page from an
# HTTP server on this host through socket NAT, ping the gateway and each other, run iperf3
# between them for 10 s, and then `vunet port-list default` shows each port's counters.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build-guest.sh
cargo build --release -p vunet >&2
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# A runtime directory of the demo's own, so that it never meets a vunet already running here;
# `vunet run` puts its sockets in $XDG_RUNTIME_DIR/vunet and the CLI looks there, no flags.
export XDG_RUNTIME_DIR=$work
vunet=target/release/vunet
echo "== vunet run"
"$vunet" run > "$work/vunet.out" 2> "$work/vunet.log" &
# The summary's last line is printed once every socket listens.
for _ in $(seq 100); do grep -q "guest RAM must be shared" "$work/vunet.out" && break; sleep 0.1; done
cat "$work/vunet.out"
grep -q "guest RAM must be shared" "$work/vunet.out" || { cat "$work/vunet.log"; exit 1; }

# A web server on one of this host's own addresses (not loopback: the guests reach the host's
# addresses through socket NAT; its loopback only with `host_loopback`).
host_ip=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -n1)
[ -n "$host_ip" ] || { echo "this host has no IPv4 address besides loopback: nothing for the guests to fetch" >&2; exit 1; }
mkdir -p "$work/www"
echo "Hello from $(hostname), served to a guest through vunet's socket NAT" > "$work/www/index.html"
port=18080
while ss -Htln "sport = :$port" | grep -q .; do port=$((port + 1)); done
busybox httpd -f -p "$host_ip:$port" -h "$work/www" &

guest() { # name socket mac script
  mkdir -p "$work/$1/add"
  printf '%s\n' "$4" > "$work/$1/add/test.sh"
  (cd "$work/$1/add" && echo test.sh | cpio -o -H newc --quiet | gzip -1) | cat guest/initramfs.gz - > "$work/$1/initrd.gz"
  qemu-system-x86_64 -accel tcg -machine memory-backend=mem -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel guest/vmlinuz -initrd "$work/$1/initrd.gz" \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -chardev socket,id=c0,path="$2" -netdev vhost-user,id=n0,chardev=c0 \
    -device virtio-net-pci,netdev=n0,mac="$3",romfile=,vectors=0 \
    -append 'console=ttyS0 quiet panic=-1 no_timer_check' < /dev/null > "$work/$1.console" 2>&1 &
}
# Busybox udhcpc asks for a lease under the guest's name (which the gateway's DNS then
# answers); the hook sets the address it got.
dhcp() {
  cat <<EOF
cat > /tmp/hook.sh <<'HOOK'
#!/bin/sh
case "\$1" in bound|renew) ip addr flush dev \$interface; ip addr add \$ip/\$mask dev \$interface; ip route add default via \$router; echo \$dns > /tmp/dns; echo "LEASED \$ip (gateway and DNS \$dns)" ;; esac
HOOK
chmod +x /tmp/hook.sh
udhcpc -i eth0 -s /tmp/hook.sh -n -q -t 10 -T 2 -x hostname:$1 || exit 3
EOF
}
# Asks the gateway for a name until the other guest has its lease; prints the answer and sets
# $addr to the address.
resolve() {
  cat <<EOF
for i in \$(seq 40); do nslookup $1 \$(cat /tmp/dns) > /tmp/ns 2>&1 && break; sleep 2; done
cat /tmp/ns
addr=\$(sed -n '/^Name:/,\$ s/^Address[^:]*: *\([0-9.]*\).*/\1/p' /tmp/ns | head -n1)
[ -n "\$addr" ] || exit 4
echo "RESOLVED $1 = \$addr"
EOF
}
echo "== booting guests vm1 (iperf3 server) and vm2 (client) on vm1.sock and vm2.sock; both ask for DHCP leases"
guest vm1 "$work/vunet/vm1.sock" 52:54:00:00:00:01 "$(dhcp vm1)
($(resolve vm2)) &
iperf3 -s -1 >/dev/null
wait"
guest vm2 "$work/vunet/vm2.sock" 52:54:00:00:00:02 "$(dhcp vm2)
$(resolve vm1)
echo '== fetching http://$host_ip:$port/ from this host'
printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 10 $host_ip $port | tail -n1
ping -c 2 \$(cat /tmp/dns) && ping -c 3 \$addr && iperf3 -c \$addr -t 10"
for _ in $(seq 180); do grep -q VUNET-TEST-EXIT "$work/vm2.console" 2>/dev/null && break; sleep 1; done
echo "== vm1's console: its lease, and vm2 by name"
sed -n '/^LEASED/,/^RESOLVED/p' "$work/vm1.console"
echo "== vm2's console: its lease, vm1 by name, the page from this host, ping, iperf3"
sed -n '/^LEASED/,/VUNET-TEST-EXIT/p' "$work/vm2.console"
grep -q "VUNET-TEST-EXIT 0" "$work/vm2.console"
grep -q "served to a guest through vunet's socket NAT" "$work/vm2.console"
echo "== vunet dhcp-leases default"
"$vunet" dhcp-leases default
echo "== vunet port-list default"
"$vunet" port-list default
