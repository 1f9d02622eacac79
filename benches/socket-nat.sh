#!/usr/bin/env bash
# Socket NAT (issue 13) against passt and QEMU's slirp, in one run, with the same TCG guest
# (same kernel and initramfs, 1 vCPU, 512 MiB, virtio-net-pci with vectors=0, memfd memory):
#   1. iperf3 TCP guest -> host and host -> guest (-R) through vunet's socket NAT, passt and
#      slirp; Mbit/s each and the ratios vunet/passt (target >= 1.5x) and vunet/slirp (>= 3x);
#   2. short TCP connections per second: the guest opens CONNS connections in a row (busybox
#      nc, one HTTP GET each to busybox httpd on the host), through each back-end;
#   3. vunet's RSS with HELD guest connections open at once (vunet only): iperf3 clients in the
#      guest, 128 parallel streams each, barely sending, to iperf3 servers on the host.
# "The host" is a network namespace this script makes (a veth pair with both ends in it,
# 10.77.0.1/24, a default route for passt to read its configuration from); vunet, passt, QEMU
# and the servers all run in it, so nothing leaves the machine. Everything is removed on exit.
# The exit status says whether every measurement ran, not whether the targets were met.
#
# Usage: benches/socket-nat.sh [SECONDS] [CONNS] [HELD]   (default 10 s, 2000, 10000)
#        BACKENDS="vunet passt slirp" picks back-ends (default all three; ratios need all);
#        KEEP_WORK=1 keeps the guests' consoles and the logs (the path is printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-2000}
held=${3:-10000}
scripts/install-deps.sh --passt
scripts/build-guest.sh
cargo build --release -p vunet >&2
work=$(mktemp -d)
# passt drops to nobody before it binds its socket: a directory nobody may write to.
chmod 755 "$work"
mkdir "$work/passt"
chown nobody "$work/passt"
ns=vusnat$$
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  # passt forks nothing with -f, but kill what is left in the namespace by pid, not by name.
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  ip netns del "$ns" 2>/dev/null || true
  if [ -n "${KEEP_WORK:-}" ]; then echo "consoles and logs kept in $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
# vunet holds one host socket per guest connection; QEMU, iperf3 servers likewise.
# Raised to the hard limit (raising that needs CAP_SYS_RESOURCE).
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -ge $((held + 1024)) ] ||
  echo "warning: open files limit $(ulimit -n) is below ${held} + 1024: vunet will refuse some connections" >&2
# `ip netns exec` execs its command, so $! after "${in_ns[@]}" CMD & is CMD's own pid.
in_ns=(ip netns exec "$ns")

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add h0 type veth peer name h1
ip -n "$ns" addr add 10.77.0.1/24 dev h0
ip -n "$ns" link set h0 up
ip -n "$ns" link set h1 up
ip -n "$ns" route add default via 10.77.0.2 dev h0
# Pings (the guests' first check) go through ping sockets in vunet and passt.
"${in_ns[@]}" sysctl -qw net.ipv4.ping_group_range='0 2147483647'
mkdir -p "$work/www"
echo HELLO-FROM-THE-HOST > "$work/www/hello.txt"
# On every address: vunet's guest reaches 10.77.0.1, passt's and slirp's their gateways, which
# both map to the host's 127.0.0.1.
"${in_ns[@]}" iperf3 -s > /dev/null 2>&1 & pids+=($!)
"${in_ns[@]}" busybox httpd -f -p 8080 -h "$work/www" & pids+=($!)
# 128 streams and one control connection per iperf3 client.
procs=$(((held + 128) / 129))
for i in $(seq "$procs"); do
  "${in_ns[@]}" iperf3 -s -p $((6000 + i)) > /dev/null 2>&1 & pids+=($!)
done

initrd() { # name script
  mkdir -p "$work/$1/add"
  printf '%s\n' "$2" > "$work/$1/add/test.sh"
  (cd "$work/$1/add" && echo test.sh | cpio -o -H newc --quiet | gzip -1) | cat guest/initramfs.gz - > "$work/$1/initrd.gz"
}
qemu() { # name netdev-args
  "${in_ns[@]}" qemu-system-x86_64 -accel tcg -machine memory-backend=mem -m 512 -smp 1 -nographic -no-reboot -nodefaults -serial stdio \
    -kernel guest/vmlinuz -initrd "$work/$1/initrd.gz" \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    $2 -device virtio-net-pci,netdev=n0,mac=52:54:00:0a:00:01,romfile=,vectors=0 \
    -append 'console=ttyS0 quiet panic=-1 no_timer_check' < /dev/null > "$work/$1.console" 2>&1 &
  qpid=$!
}
# The guest: a DHCP lease, iperf3 both ways, then CONNS short connections timed with
# /proc/uptime; with a second argument also the held connections.
guest_script() { # server [hold]
  local s=$1
  cat <<EOF
cat > /tmp/hook.sh <<'HOOK'
#!/bin/sh
case "\$1" in bound|renew) ip addr flush dev \$interface; ip addr add \$ip/\$mask dev \$interface
  for r in \$router; do ip route add default via \$r; done; echo "LEASED \$ip" ;; esac
HOOK
chmod +x /tmp/hook.sh
udhcpc -i eth0 -s /tmp/hook.sh -n -q -t 10 -T 2 || exit 3
ping -c 1 -W 5 $s > /dev/null
iperf3 -c $s -t $secs -J > /tmp/up.json; echo UP-JSON-BEGIN; cat /tmp/up.json; echo UP-JSON-END
iperf3 -c $s -t $secs -J -R > /tmp/down.json; echo DOWN-JSON-BEGIN; cat /tmp/down.json; echo DOWN-JSON-END
# busybox nc's -w bounds only the connect: timeout(1) bounds the whole connection.
get() { printf 'GET /hello.txt HTTP/1.0\r\n\r\n' | timeout 2 nc $s 8080; }
# At most 120 s. Stalled: a connection that took over a second (nc killed after 2 s, waiting for a
# FIN that never came).
read t0 _ < /proc/uptime; i=0; ok=0; stalled=0; t=\$t0
while [ \$i -lt $conns ] && [ \$((\${t%.*} - \${t0%.*})) -lt 120 ]; do
  a=\${t%.*}; get | grep -q HELLO-FROM-THE-HOST && ok=\$((ok + 1)); i=\$((i + 1))
  read t _ < /proc/uptime; [ \$((\${t%.*} - a)) -ge 2 ] && stalled=\$((stalled + 1))
done
echo "CONNS \$ok \$t0 \$t \$i \$stalled"
EOF
  [ -n "${2:-}" ] || return 0
  cat <<EOF
echo HOLD-READY; sleep 5
p=1; while [ \$p -le $procs ]; do
  iperf3 -c $s -p \$((6000 + p)) -P 128 -t 3600 -i 0 -b 1 -l 64 --pacing-timer 1000000 > /dev/null 2>&1 &
  p=\$((p + 1))
done
n=0; k=0
while [ \$k -lt 300 ]; do
  n=\$(grep -c '^ *[0-9]*: [0-9A-F]*:[0-9A-F]* [0-9A-F]*:[0-9A-F]* 01 ' /proc/net/tcp)
  [ \$n -ge $held ] && break
  sleep 2; k=\$((k + 2))
done
echo "HELD \$n"; sleep 3600
EOF
}
wait_for() { # file pattern seconds
  for _ in $(seq $(($3 * 5))); do grep -qa "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done
  return 1
}
json() { # console start-marker end-marker -> Mbit/s received, or "nan"
  sed -n "/$2/,/$3/p" "$1" | sed '1d;$d' | tr -d '\r' |
    python3 -c 'import json,sys
try: print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e6))
except Exception: print("nan")'
}
conns_per_s() { # console -> "ok per-second tried stalled"
  grep -a '^CONNS ' "$1" | tr -d '\r' | awk '{d = $4 - $3; printf "%d %.1f %d %d\n", $2, (d > 0 ? $2 / d : 0), $5, $6}' | tail -n1
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# Runs one back-end: boots the guest, waits for its results, prints "up down ok conns/s".
finish() { # name
  local c="$work/$1.console" r
  if ! wait_for "$c" 'CONNS \|VUNET-TEST-EXIT' $((2 * secs + 400)); then
    echo "$1: the guest did not finish; console:" >&2; tail -n 30 "$c" >&2
  fi
  r=$(conns_per_s "$c"); [ -n "$r" ] || r="0 nan 0 0"
  echo "$(json "$c" UP-JSON-BEGIN UP-JSON-END) $(json "$c" DOWN-JSON-BEGIN DOWN-JSON-END) $r"
}

run_vunet() {
  cat > "$work/vunet.toml" <<EOF
control_socket = "$work/control.sock"
[[network]]
name = "default"
mode = "nat"
gateway = "192.168.122.1/24"
[network.dhcp]
range = ["192.168.122.100", "192.168.122.200"]
[network.nat]
max_connections = $((held + 1024))
max_per_guest = $((held + 1024))
[[network.port]]
name = "vm1"
socket = "$work/vm1.sock"
EOF
  "${in_ns[@]}" target/release/vunet run --config "$work/vunet.toml" > "$work/vunet.out" 2> "$work/vunet.log" &
  vpid=$!
  pids+=("$vpid")
  for _ in $(seq 50); do [ -S "$work/vm1.sock" ] && break; sleep 0.1; done
  initrd vunet "$(guest_script 10.77.0.1 hold)"
  qemu vunet "-chardev socket,id=c0,path=$work/vm1.sock -netdev vhost-user,id=n0,chardev=c0"
  vunet_result=$(finish vunet)
  rss_before=$(rss_kb "$vpid")
  if wait_for "$work/vunet.console" HOLD-READY 60; then
    rss_before=$(rss_kb "$vpid")
    wait_for "$work/vunet.console" '^HELD ' 420 || true
    sleep 3 # the last streams' flows
    rss_held=$(rss_kb "$vpid")
    flows=$(target/release/vunet net-list --json --control "$work/control.sock" 2> /dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["socket_nat"]["tcp_flows"])' 2> /dev/null || echo "?")
    held_n=$(grep -a '^HELD ' "$work/vunet.console" | tr -d '\r' | awk '{print $2}' | tail -n1)
  fi
  kill "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true
  kill "$vpid" 2>/dev/null || true; wait "$vpid" 2>/dev/null || true
}

run_passt() {
  # -f: stay in the foreground (killed by pid at the end); -4: the namespace has no IPv6 route.
  "${in_ns[@]}" passt -f -q -4 -s "$work/passt/passt.sock" > "$work/passt.log" 2>&1 &
  local ppid=$!
  pids+=("$ppid")
  for _ in $(seq 50); do [ -S "$work/passt/passt.sock" ] && break; sleep 0.1; done
  # passt hands the guest the host's own address (10.77.0.1) and its gateway, 10.77.0.2; TCP
  # to the gateway reaches the host's loopback.
  initrd passt "$(guest_script 10.77.0.2)"
  # QEMU 7.2 has -netdev stream (passt's own framing over a unix socket): no qrap needed.
  qemu passt "-netdev stream,id=n0,server=off,addr.type=unix,addr.path=$work/passt/passt.sock"
  passt_result=$(finish passt)
  kill "$qpid" "$ppid" 2>/dev/null || true; wait "$qpid" "$ppid" 2>/dev/null || true
}

run_slirp() {
  initrd slirp "$(guest_script 10.0.2.2)"
  qemu slirp "-netdev user,id=n0"
  slirp_result=$(finish slirp)
  kill "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true
}

echo "socket NAT: iperf3 TCP ${secs} s each way, ${conns} short connections, ${held} held; TCG guest (1 vCPU, 512 MiB), $(nproc) cores, $(date -u +%F)"
vunet_result="nan nan 0 nan 0 0"; passt_result=$vunet_result; slirp_result=$vunet_result
rss_before=""; rss_held=""; held_n=""; flows="?"
for b in ${BACKENDS:-vunet passt slirp}; do "run_$b"; done
python3 - "$vunet_result" "$passt_result" "$slirp_result" "$rss_before" "$rss_held" "${held_n:-0}" "$flows" "$conns" <<'PY'
import math, sys
v, p, s = ([float(x) for x in a.split()] for a in sys.argv[1:4])
rss0, rss1, held, flows, conns = sys.argv[4], sys.argv[5], int(sys.argv[6] or 0), sys.argv[7], int(sys.argv[8])
ran = True
def rate(x):
    return "%.1f Mbit/s" % x if not math.isnan(x) else "failed"
for name, r in (("vunet", v), ("passt", p), ("slirp", s)):
    print("%-6s guest->host %s, host->guest %s; short connections: %.1f/s (%d of %d tried succeeded, %d stalled > 1 s)"
          % (name, rate(r[0]), rate(r[1]), r[3], r[2], r[4], r[5]))
    ran &= not math.isnan(r[0]) and not math.isnan(r[1]) and r[2] > 0
for name, r, target in (("passt", p, 1.5), ("slirp", s, 3.0)):
    for d, i in (("guest->host", 0), ("host->guest", 1)):
        if math.isnan(v[i]) or math.isnan(r[i]) or r[i] == 0:
            print("vunet/%s %s: no figure" % (name, d)); continue
        q = v[i] / r[i]
        print("vunet/%s %s = %.2fx (target >= %.1fx) %s" % (name, d, q, target, "PASS" if q >= target else "FAIL"))
    if r[3] > 0 and not math.isnan(r[3]):
        print("vunet/%s connections/s = %.2fx" % (name, v[3] / r[3]))
if rss0 and rss1 and held > 0:
    b, a = int(rss0), int(rss1)
    n = int(flows) if flows.isdigit() else held  # what vunet holds, else what the guest counted
    print("vunet RSS: %d KiB before, %d KiB with %d guest connections open (vunet holds %s TCP flows): %.2f KiB per flow"
          % (b, a, held, flows, (a - b) / n))
else:
    print("vunet RSS with held connections: no figure (before %r, after %r, held %d)" % (rss0, rss1, held)); ran = False
sys.exit(0 if ran else 1)
PY
