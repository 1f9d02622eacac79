#!/usr/bin/env bash
# The main job in one command: starts vunet's default network, boots two QEMU guests (TCG) on
# it, pings vunet's gateway and from one guest to the other, and runs iperf3 between them for 10 s, then prints the result.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build-guest.sh
cargo build --release -p vunet >&2
work=$(mktemp -d)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/rt"
echo "== vunet run (default network, sockets in $work/rt)"
target/release/vunet run --runtime-dir "$work/rt" > "$work/vunet.out" 2> "$work/vunet.log" &
for _ in $(seq 50); do [ -S "$work/rt/vm2.sock" ] && break; sleep 0.1; done
cat "$work/vunet.out"

guest() { # name socket mac script
  mkdir -p "$work/$1/add"
  printf '%s\n' "$4" > "$work/$1/add/test.sh"
  (cd "$work/$1/add" && echo test.sh | cpio -o -H newc --quiet | gzip -1) | cat guest/initramfs.gz - > "$work/$1/initrd.gz"
  qemu-system-x86_64 -accel tcg -machine memory-backend=mem -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel guest/vmlinuz -initrd "$work/$1/initrd.gz" \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -chardev socket,id=c0,path="$2" -netdev vhost-user,id=n0,chardev=c0 \
    -device virtio-net-pci,netdev=n0,mac="$3",romfile=,vectors=0 \
    -append 'console=ttyS0 quiet panic=-1' < /dev/null > "$work/$1.console" 2>&1 &
}
echo "== booting guest vm1 (192.168.122.11, iperf3 server) and vm2 (192.168.122.12, client)"
guest vm1 "$work/rt/vm1.sock" 52:54:00:00:00:01 'ip addr add 192.168.122.11/24 dev eth0; iperf3 -s -1 >/dev/null'
guest vm2 "$work/rt/vm2.sock" 52:54:00:00:00:02 'ip addr add 192.168.122.12/24 dev eth0; sleep 2; ping -c 2 192.168.122.1 && ping -c 3 192.168.122.11 && iperf3 -c 192.168.122.11 -t 10'
for _ in $(seq 120); do grep -q VUNET-TEST-EXIT "$work/vm2.console" 2>/dev/null && break; sleep 1; done
echo "== vm2's console"
sed -n '/PING/,/VUNET-TEST-EXIT/p' "$work/vm2.console"
grep -q "VUNET-TEST-EXIT 0" "$work/vm2.console"
