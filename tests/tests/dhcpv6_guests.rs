//! Real guests (QEMU, TCG) leasing IPv6 addresses from the gateway's DHCPv6 server with ISC
//! dhclient: a static host by MAC and an address from the range, listed by `vunet
//! dhcp-leases`, renewed, and kept in the lease file.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vunet_tests::guest::{serial, vunet_binary, Guest, Socket, VunetProcess};
use vunet_tests::netns::wait_until;
use vunet_tests::TempDir;

const BOOT_AND_RUN: Duration = Duration::from_secs(240);
const STATIC_MAC: &str = "52:54:00:06:00:01";
const RANGE_MAC: &str = "52:54:00:06:00:02";

const NETWORK: &str = "[[network]]\nname = \"six\"\nmode = \"isolated\"\ngateway = \"10.6.0.1/24\"\ngateway6 = \"fd00:7675:1::1/64\"\n\
     [network.dhcp]\nrange = [\"10.6.0.100\", \"10.6.0.200\"]\n\
     [network.dhcp6]\nrange = [\"fd00:7675:1::100\", \"fd00:7675:1::1ff\"]\nlease_time = 120\n\
     hosts = [{ mac = \"52:54:00:06:00:01\", ip = \"fd00:7675:1::10\", name = \"web\" }]\n\
     [[network.port]]\nname = \"vm1\"\nsocket = \"vm1.sock\"\n[[network.port]]\nname = \"vm2\"\nsocket = \"vm2.sock\"\n";

/// The guest's part: waits for its link-local address (dhclient binds to it), leases an
/// address with `dhclient -6`, then drives a renewal without waiting for T1 (60 s): it stops
/// dhclient, moves its clock past T1 and starts it again on the same lease file, so dhclient
/// confirms the lease and renews it at once (in the foreground, so its script's marker
/// reaches the console).
const SCRIPT: &str = "for i in $(seq 100); do ip -6 addr show dev eth0 | grep -q fe80 && ! ip -6 addr show dev eth0 | grep -q tentative && break; sleep 0.1; done\n\
     ip -6 addr show dev eth0\n\
     dhclient -6 -v -1 -lf /var/lib/dhcp/d6.leases -pf /run/d6.pid eth0 || exit 3\n\
     ip -6 addr show dev eth0 | grep 'scope global' || exit 4\n\
     echo DHCP6-BOUND\n\
     sleep 3\n\
     kill $(cat /run/d6.pid); sleep 1\n\
     date -s @$(( $(date +%s) + 75 )) >/dev/null\n\
     echo GUEST-RESTARTS-DHCLIENT\n\
     dhclient -6 -d -v -lf /var/lib/dhcp/d6.leases -pf /run/d6.pid eth0\n";

fn leases(ctl: &Path) -> serde_json::Value {
    let out = Command::new(vunet_binary())
        .args(["dhcp-leases", "six", "--json", "--control", ctl.to_str().unwrap()])
        .output()
        .expect("vunet dhcp-leases");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("json")
}

fn lease_of<'a>(l: &'a serde_json::Value, ip: &str) -> Option<&'a serde_json::Value> {
    l.as_array().unwrap().iter().find(|x| x["ip"] == ip)
}

#[test]
fn guests_lease_ipv6_addresses_with_dhclient_and_renew_them() {
    let _turn = serial();
    let dir = TempDir::new("dhcpv6-guests");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(&cfg, format!("state_dir = \"state\"\ncontrol_socket = \"control.sock\"\n{NETWORK}")).unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let ctl = dir.path().join("control.sock");
    let _v = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    let g1 = Guest::boot("g1", dir.path(), &Socket::Connect(dir.path().join("vm1.sock")), STATIC_MAC, "", SCRIPT);
    let g2 = Guest::boot("g2", dir.path(), &Socket::Connect(dir.path().join("vm2.sock")), RANGE_MAC, "", SCRIPT);
    let log = || std::fs::read_to_string(dir.path().join("vunet.log")).unwrap_or_default();
    for (g, want) in [(&g1, "fd00:7675:1::10"), (&g2, "fd00:7675:1::100")] {
        assert!(g.console.wait_for("DHCP6-BOUND", BOOT_AND_RUN), "{} bound:\n{}\nvunet:\n{}", g.name, g.console.text(), log());
        let out = g.console.text();
        assert!(out.contains(&format!("VUNET-DHCP6 BOUND6 {want}")), "{} got {want}:\n{out}", g.name);
        assert!(out.contains(&format!("inet6 {want}/128 scope global")), "the address is on eth0:\n{out}");
    }
    // Listed, with the client's MAC (from its DUID), the static host's name, DUID and IAID.
    let first = leases(&ctl);
    let l1 = lease_of(&first, "fd00:7675:1::10").unwrap_or_else(|| panic!("static lease listed: {first}"));
    assert_eq!((l1["mac"].as_str(), l1["name"].as_str()), (Some(STATIC_MAC), Some("web")), "{first}");
    assert!(l1["duid"].as_str().is_some_and(|d| d.ends_with("525400060001")), "DUID with the guest's MAC: {first}");
    let l2 = lease_of(&first, "fd00:7675:1::100").unwrap_or_else(|| panic!("range lease listed: {first}"));
    assert_eq!(l2["mac"].as_str(), Some(RANGE_MAC));
    let expires1 = l1["expires"].as_u64().unwrap();

    // The renewal is answered: dhclient reports RENEW6 with the same address, and the lease
    // runs longer.
    for (g, want) in [(&g1, "fd00:7675:1::10"), (&g2, "fd00:7675:1::100")] {
        assert!(
            g.console.wait_for("GUEST-RESTARTS-DHCLIENT", BOOT_AND_RUN),
            "{} renewed:\n{}\nvunet:\n{}",
            g.name,
            g.console.text(),
            log()
        );
        assert!(
            g.console.wait_for(&format!("VUNET-DHCP6 RENEW6 {want}"), Duration::from_secs(30)),
            "{} renewed {want}:\n{}",
            g.name,
            g.console.text()
        );
    }
    let renewed = leases(&ctl);
    let e = lease_of(&renewed, "fd00:7675:1::10").and_then(|l| l["expires"].as_u64()).unwrap_or(0);
    assert!(e > expires1, "renewal extends the lease: {expires1} then {renewed}");

    // The lease file holds the IPv6 leases (format version 2), next to the IPv4 ones.
    let file = dir.path().join("state/six.leases");
    let text = || std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || text().contains(&format!("fd00:7675:1::10 {e} web "))
            && text().contains("fd00:7675:1::100 ")),
        "lease file: {}",
        text()
    );
    assert!(text().starts_with("# vunet leases v2\n"), "{}", text());
}
