//! Any bytes as a VXLAN datagram from the underlay (the first four are its source address),
//! fed to a VNI's decapsulation with a learning table kept across inputs: never a panic, the
//! table stays within its capacity and each remote within its quota, and the flow hash of any
//! inner frame gives a source port in the range asked for.
#![no_main]
use std::net::Ipv4Addr;
use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use vunet_switch::vxlan::{flow_hash, source_port, Decap, Table, Target, SRC_PORT_MAX, SRC_PORT_MIN};

static TABLE: Mutex<Option<(Table, u64)>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let from = Ipv4Addr::new(data[0], data[1], data[2], data[3]);
    let dgram = &data[4..];
    let mut guard = TABLE.lock().unwrap();
    let (table, now) = guard.get_or_insert_with(|| (Table::new(300_000, 64, 16), 0));
    *now += 1000;
    let d = Decap { vni: 42, max_inner: 1518 };
    if let Ok((at, len)) = d.input(dgram, from, table, *now) {
        let inner = &dgram[at..at + len];
        assert!(len >= 14 && len <= 1518);
        let p = source_port(flow_hash(inner), SRC_PORT_MIN, SRC_PORT_MAX);
        assert!(p >= SRC_PORT_MIN);
        let src: [u8; 6] = inner[6..12].try_into().unwrap();
        assert_eq!(table.lookup(42, &src, *now), Target::One(from), "the source was learned behind its sender");
    }
    assert!(table.len() <= 64);
    assert!(table.count(from) <= 16);
    if *now % 100_000 == 0 {
        table.expire(*now);
    }
});
