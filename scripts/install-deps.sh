#!/usr/bin/env bash
# Installs the Debian packages vunet's tests and benchmarks need. Idempotent: does nothing when
# everything is present. Usage: scripts/install-deps.sh [--bench] [--passt]
set -euo pipefail
pkgs=(qemu-system-x86 busybox-static iperf3 cpio dnsmasq-base isc-dhcp-client iproute2 tshark systemd)
# Open vSwitch (its userspace datapath) for tests/tests/vxlan.rs.
pkgs+=(openvswitch-switch)
# libvirt's system daemon for tests/tests/libvirt_domain.rs (scripts/start-libvirtd.sh starts it).
pkgs+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
for a in "$@"; do
  case $a in
    --bench) pkgs+=(dpdk-dev bridge-utils valgrind) ;;
    # benches/socket-nat.sh compares socket NAT with passt.
    --passt) pkgs+=(passt) ;;
  esac
done
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
