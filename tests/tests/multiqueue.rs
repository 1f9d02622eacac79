//! Multiqueue with real guests: two QEMU guests with two vCPUs and two queue pairs each
//! (`queues = 2` on the port; QEMU `-netdev vhost-user,...,queues=2`, `-device
//! virtio-net-pci,mq=on`). The guests' drivers bring up both pairs; an iperf3 client on each
//! vCPU sends on its own TX queue, vunet steers the flows over the receiver's two RX queues,
//! and vunet's per-queue counters show every queue carried frames. Sixteen flows, so that the
//! flow hash putting them all on one queue (2 in 65,536) is not what the test measures.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vunet_tests::guest::*;
use vunet_tests::*;

const BOOT_AND_RUN: Duration = Duration::from_secs(300);

fn config(dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("vunet.toml");
    let ports: String =
        ["vm1", "vm2"].iter().map(|p| format!("[[network.port]]\nname = \"{p}\"\nsocket = \"{p}.sock\"\nqueues = 2\n")).collect();
    std::fs::write(&cfg, format!("control_socket = \"control.sock\"\n[[network]]\nname = \"mq\"\nmode = \"bridge\"\n{ports}")).unwrap();
    cfg
}

/// Frames per queue pair of one port, from `vunet port-list --json`: (to the guest, from it).
fn queue_frames(control: &Path, port: &str) -> Vec<(u64, u64)> {
    let out = Command::new(vunet_binary()).args(["port-list", "mq", "--json", "--control", control.to_str().unwrap()]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("port-list --json");
    let p = v.as_array().unwrap().iter().find(|p| p["name"] == port).unwrap_or_else(|| panic!("port {port} in {v}"));
    p["queues"].as_array().unwrap().iter().map(|q| (q["to_guest"].as_u64().unwrap(), q["from_guest"].as_u64().unwrap())).collect()
}

#[test]
fn two_queue_pairs_each_carry_traffic_between_two_vcpu_guests() {
    let _turn = serial();
    let dir = TempDir::new("mq");
    let cfg = config(dir.path());
    let _vunet = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    let server_script = format!(
        "iperf3 -s -p 5201 >/dev/null 2>&1 &\niperf3 -s -p 5202 >/dev/null 2>&1 &\n{}{}\
         ls /sys/class/net/eth0/queues\nip addr add 10.0.0.1/24 dev eth0\necho SERVER-UP\nsleep 600\n",
        await_listening("tcp", 5201, 3),
        await_listening("tcp", 5202, 3)
    );
    let server =
        Guest::boot_with("srv", dir.path(), &Socket::Connect(dir.path().join("vm1.sock")), "52:54:00:00:00:01", "", &server_script, 2, 2);
    let client_script = format!(
        "ip addr add 10.0.0.2/24 dev eth0\necho CPUS $(nproc)\nls /sys/class/net/eth0/queues\n{}\
         taskset -c 0 iperf3 -c 10.0.0.1 -p 5201 -t 4 -P 8 > /tmp/a 2>&1 &\n\
         taskset -c 1 iperf3 -c 10.0.0.1 -p 5202 -t 4 -P 8 > /tmp/b 2>&1\nwait\ncat /tmp/a /tmp/b\n\
         [ $(grep -c receiver /tmp/a /tmp/b | grep -c ':[1-9]') = 2 ] || exit 4\n",
        await_peer("10.0.0.1", 5)
    );
    let client =
        Guest::boot_with("cli", dir.path(), &Socket::Connect(dir.path().join("vm2.sock")), "52:54:00:00:00:02", "", &client_script, 2, 2);
    assert_eq!(client.wait_exit(BOOT_AND_RUN), Some(0), "client:\n{}\nserver:\n{}", client.console.text(), server.console.text());
    let c = client.console.text();
    assert!(c.contains("CPUS 2"), "two vCPUs:\n{c}");
    assert!(c.contains("rx-1") && c.contains("tx-1"), "the driver brought up the second queue pair:\n{c}");
    let control = dir.path().join("control.sock");
    let (tx_side, rx_side) = (queue_frames(&control, "vm2"), queue_frames(&control, "vm1"));
    eprintln!("frames per queue pair (to guest, from guest): client {tx_side:?}, server {rx_side:?}");
    assert_eq!((tx_side.len(), rx_side.len()), (2, 2), "two pairs each: {tx_side:?} {rx_side:?}");
    assert!(tx_side.iter().all(|&(_, from)| from > 100), "the client sent on both TX queues: {tx_side:?}");
    assert!(rx_side.iter().all(|&(to, _)| to > 100), "vunet steered the flows over both of the server's RX queues: {rx_side:?}");
    drop(server);
}
