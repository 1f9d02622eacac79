//! Real guests on VLANs: two on access VLAN 10 and one on VLAN 20 (all in one IP subnet, so
//! only the VLANs keep them apart), and a trunk guest with 802.1Q sub-interfaces
//! (`ip link add link eth0 name eth0.10 type vlan id 10`, the guest's 8021q module) that
//! reaches both VLANs and, untagged, the gateway.

use std::time::Duration;

use vunet_tests::guest::*;
use vunet_tests::TempDir;

const BOOT_AND_RUN: Duration = Duration::from_secs(240);

fn ping_ok(out: &str, count: u32) -> bool {
    out.contains(&format!("{count} packets transmitted, {count} packets received"))
}

/// Creates `eth0.<id>` (busybox's `ip`, else `vconfig`) and brings it up.
fn vlan_if(id: u16) -> String {
    format!(
        "ip link add link eth0 name eth0.{id} type vlan id {id} 2>/dev/null || vconfig add eth0 {id} || exit 7\nip link set eth0.{id} up\n"
    )
}

#[test]
fn access_vlans_are_apart_and_a_trunk_guest_reaches_them_tagged() {
    let _turn = serial();
    let dir = TempDir::new("vlan-guests");
    let cfg = dir.path().join("vunet.toml");
    std::fs::write(
        &cfg,
        "[[network]]\nname = \"v\"\nmode = \"isolated\"\ngateway = \"10.0.0.1/24\"\n\
         [[network.port]]\nname = \"a10\"\nsocket = \"a10.sock\"\nvlan = 10\n\
         [[network.port]]\nname = \"b10\"\nsocket = \"b10.sock\"\nvlan = 10\n\
         [[network.port]]\nname = \"c20\"\nsocket = \"c20.sock\"\nvlan = 20\n\
         [[network.port]]\nname = \"tr\"\nsocket = \"tr.sock\"\ntrunk = [10, 20]\n",
    )
    .unwrap();
    let _vunet = VunetProcess::start(&["--config", cfg.to_str().unwrap()], &dir.path().join("vunet.log"));
    let sock = |n: &str| Socket::Connect(dir.path().join(format!("{n}.sock")));

    // B (VLAN 10) only answers.
    let b10 = Guest::boot("b10", dir.path(), &sock("b10"), "52:54:00:00:10:02", "", "ip addr add 10.10.0.2/24 dev eth0\nsleep 600\n");
    // C (VLAN 20) has an address in the VLAN 10 guests' subnet too: if a frame of VLAN 10
    // reached it, it would answer.
    let c20 = Guest::boot(
        "c20",
        dir.path(),
        &sock("c20"),
        "52:54:00:00:20:03",
        "",
        "ip addr add 10.10.0.3/24 dev eth0\nip addr add 10.20.0.3/24 dev eth0\nsleep 600\n",
    );
    // The trunk guest: VLAN 20 first; it gives itself its VLAN 10 address only once it reached
    // C, so A's wait for that address also waits for C to be up.
    let trunk = Guest::boot(
        "trunk",
        dir.path(),
        &sock("tr"),
        "52:54:00:00:00:04",
        "",
        &format!(
            "{}{}ip addr add 10.20.0.4/24 dev eth0.20\n{}ip addr add 10.10.0.4/24 dev eth0.10\nip addr add 10.0.0.4/24 dev eth0\n\
             {}ping -c 3 -W 5 10.10.0.2 || exit 1\nping -c 3 -W 5 10.20.0.3 || exit 2\nping -c 3 -W 5 10.0.0.1 || exit 3\n{}",
            vlan_if(10),
            vlan_if(20),
            await_peer("10.20.0.3", 8),
            await_peer("10.10.0.2", 9),
            // Stays up until A has pinged it.
            "sleep 40\n",
        ),
    );
    let a10 = Guest::boot(
        "a10",
        dir.path(),
        &sock("a10"),
        "52:54:00:00:10:01",
        "",
        &format!(
            "ip addr add 10.10.0.1/24 dev eth0\n{}{}ping -c 3 -W 5 10.10.0.2 || exit 1\nping -c 3 -W 5 10.10.0.4 || exit 2\n\
             echo VLAN-20-NEXT\nping -c 3 -W 2 10.10.0.3 && exit 3\nexit 0\n",
            await_peer("10.10.0.2", 8),
            await_peer("10.10.0.4", 9)
        ),
    );
    assert_eq!(a10.wait_exit(BOOT_AND_RUN), Some(0), "a10:\n{}", a10.console.text());
    let out = a10.console.text();
    assert_eq!(out.matches("3 packets transmitted, 3 packets received").count(), 2, "A reaches B and the trunk guest:\n{out}");
    assert!(out.contains("3 packets transmitted, 0 packets received"), "A does not reach C on VLAN 20:\n{out}");
    assert_eq!(trunk.wait_exit(BOOT_AND_RUN), Some(0), "trunk:\n{}", trunk.console.text());
    let t = trunk.console.text();
    assert!(
        ping_ok(&t, 3) && t.matches("3 packets transmitted, 3 packets received").count() == 3,
        "trunk reaches VLAN 10, VLAN 20 and the gateway:\n{t}"
    );
    drop((b10, c20));
}
