#!/usr/bin/env bash
# Builds the tiny test guest from Debian packages: the Debian kernel (vmlinuz) and an initramfs
# with busybox, iperf3, ISC dhclient (for DHCPv6), the virtio-net modules and 8021q (VLAN
# sub-interfaces). The result is cached in guest/ (or $VUNET_GUEST_DIR) and rebuilt only when
# missing or built from another version of this script (guest/VERSION).
#
# The guest's /init loads virtio-net, brings eth0 up, then runs /test.sh, which a test appends
# to the initramfs as a second cpio archive (the kernel unpacks concatenated archives).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${VUNET_GUEST_DIR:-$here/guest}
# Bumped whenever the image's contents change, so cached images (CI's too) are rebuilt.
# 2: the 8021q module and its dependencies; dhclient and its /sbin/dhclient-script.
# 3: both of those together.
version=3
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.gz" ] && [ "$(cat "$out/VERSION" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
"$here/scripts/install-deps.sh"
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
# linux-image-amd64 is a metapackage: find the versioned kernel package it depends on.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$kpkg" ]; then
  apt-get update -qq
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
apt-get download "$kpkg" >/dev/null
dpkg -x ./*.deb kernel
cp kernel/boot/vmlinuz-* "$out/vmlinuz.tmp"

root=$work/root
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,etc/dhcp,lib/modules,usr/bin,root,run,var/lib/dhcp}
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ "$applet" = busybox ] && continue
  ln -sf busybox "$root/bin/$applet"
done
# The modules the guest loads, dependencies first: virtio-net, and 802.1Q VLANs (8021q with
# the GARP/MRP, STP and LLC modules it needs).
modules="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net llc stp garp mrp 8021q"
for m in $modules; do
  f=$(find kernel/lib/modules -name "$m.ko*" | head -n1)
  [ -n "$f" ] || continue
  case "$f" in
    *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
    *.zst) zstd -dcq "$f" > "$root/lib/modules/$m.ko" ;;
    *) cp "$f" "$root/lib/modules/$m.ko" ;;
  esac
done
echo "$modules" > "$root/lib/modules/order"
# iperf3 and the shared libraries it needs.
cp /usr/bin/iperf3 "$root/usr/bin/iperf3"
for lib in $(ldd /usr/bin/iperf3 | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# ISC dhclient (DHCPv6 client) and its libraries; its script only adds the address it got and
# says so on the console, for the tests to see.
cp /sbin/dhclient "$root/sbin/dhclient"
for lib in $(ldd /sbin/dhclient | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
: > "$root/etc/dhcp/dhclient.conf"
cat > "$root/sbin/dhclient-script" <<'SCRIPT'
#!/bin/sh
case "$reason" in
  BOUND6|RENEW6|REBIND6)
    [ -n "$new_ip6_address" ] && ip -6 addr add "$new_ip6_address/128" dev "$interface" 2>/dev/null
    echo "VUNET-DHCP6 $reason $new_ip6_address"
    ;;
esac
exit 0
SCRIPT
chmod +x "$root/sbin/dhclient-script"
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for i in 1 2 3 4; do
  for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko 2>/dev/null
  done
done
ip link set lo up
ip link set eth0 up 2>/dev/null
echo VUNET-GUEST-UP
if [ -f /test.sh ]; then sh /test.sh; echo "VUNET-TEST-EXIT $?"; fi
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.gz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
echo "$version" > "$out/VERSION"
echo "guest image: $out (kernel $kpkg)" >&2
