#!/usr/bin/env bash
# Makes libvirt's system daemon usable on a machine without systemd (CI containers, the test
# machines): the QEMU user and directories the package scripts of libvirt-daemon-system would
# create, then virtlogd and libvirtd unless they already run. Idempotent; needs root and the
# packages of `scripts/install-deps.sh --libvirt`.
#
# Prints one line `started NAME PID` for each daemon it started, so whoever ran it can stop
# exactly those (by pid) and leave daemons that were already running alone.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "start-libvirtd.sh: needs root" >&2; exit 1; }
for b in virtlogd libvirtd virsh; do
  command -v "$b" >/dev/null || { echo "start-libvirtd.sh: $b is not installed (scripts/install-deps.sh --libvirt)" >&2; exit 1; }
done

# Debian's libvirt runs QEMU as user and group libvirt-qemu.
getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
if ! getent passwd libvirt-qemu >/dev/null; then
  useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
    --shell /usr/sbin/nologin libvirt-qemu
fi
if getent group kvm >/dev/null && ! id -nG libvirt-qemu | tr ' ' '\n' | grep -qx kvm; then
  usermod -a -G kvm libvirt-qemu
fi
mkdir -p /var/log/libvirt /var/lib/libvirt /var/cache/libvirt /run/libvirt

# A daemon runs if its pid file names a live process of that name.
running() {
  local pid
  pid=$(cat "$2" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

# Waits (up to 10 s) for a daemon's pid file, then prints it as started.
started() {
  for _ in $(seq 100); do
    if running "$1" "$2"; then
      echo "started $1 $(cat "$2")"
      return 0
    fi
    sleep 0.1
  done
  echo "start-libvirtd.sh: $1 did not start (see /var/log/libvirt)" >&2
  exit 1
}

if ! running virtlogd /run/virtlogd.pid; then
  virtlogd -d
  started virtlogd /run/virtlogd.pid
fi
if ! running libvirtd /run/libvirtd.pid; then
  libvirtd -d
  started libvirtd /run/libvirtd.pid
fi
# libvirtd writes its pid file before its socket accepts: wait until virsh gets an answer.
for _ in $(seq 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.1
done
echo "start-libvirtd.sh: libvirtd does not answer on qemu:///system" >&2
exit 1
