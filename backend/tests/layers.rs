//! The backend's layers stay true: each file of backend/src imports only the layers below its
//! own (and its own unit), so the data path never names a port kind, a gateway service, the
//! run-time layer or control, and port kinds and services never name each other.
//!
//! | rank | layer | files |
//! |---|---|---|
//! | 6 | CLI | main.rs, lib.rs |
//! | 5 | daemon | daemon.rs |
//! | 4 | control, metrics | control.rs, capture.rs, metrics.rs |
//! | 3 | run-time supervision | runtime/ |
//! | 2 | port kinds, gateway services | ports/vhost, ports/uplink, services/arp_icmp, services/dhcp, services/dhcp6, services/dns |
//! | 1 | the data path | datapath/ |
//! | 0 | configuration | config.rs, libvirt.rs |
//!
//! A file may import a lower rank, or its own unit (the folder or file in the table); an
//! import of the same rank in another unit, or of a higher rank, is a violation.

use std::path::{Path, PathBuf};

/// The unit a module path belongs to, and its rank.
fn unit(module: &[String]) -> Option<(String, u8)> {
    let first = module.first()?.as_str();
    let second = module.get(1).map(String::as_str);
    Some(match (first, second) {
        ("main" | "lib", _) => (first.to_string(), 6),
        ("daemon", _) => ("daemon".into(), 5),
        ("control" | "capture" | "metrics", _) => ("control".into(), 4),
        ("runtime", _) => ("runtime".into(), 3),
        ("ports" | "services", Some(kind)) => (format!("{first}/{kind}"), 2),
        // The folder's own mod.rs only lists its kinds.
        ("ports" | "services", None) => (first.to_string(), 2),
        ("datapath", _) => ("datapath".into(), 1),
        ("config" | "libvirt", _) => ("config".into(), 0),
        _ => return None,
    })
}

/// The module path of a file under backend/src: `datapath/switch.rs` → [datapath, switch],
/// `services/dns/mod.rs` → [services, dns].
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs").to_string();
        if stem != "mod" {
            parts.push(stem);
        }
    }
    parts
}

/// Every module path a file's code names through `crate::` or `super::` (comments ignored).
fn imports(module: &[String], text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::").or_else(|| rest.find("super::")) {
            let (base, after) = if rest[i..].starts_with("crate::") {
                (Vec::new(), &rest[i + "crate::".len()..])
            } else {
                // A chain of `super::` climbs one module each.
                let mut up = module.len();
                let mut s = &rest[i..];
                while let Some(t) = s.strip_prefix("super::") {
                    up = up.saturating_sub(1);
                    s = t;
                }
                (module[..up].to_vec(), s)
            };
            // `crate::{a, b::c}` names several; `crate::a::b` one.
            let names: Vec<String> = if let Some(group) = after.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                group[..end].split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
            } else {
                vec![after.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).next().unwrap_or("").to_string()]
            };
            for n in names {
                let mut m = base.clone();
                m.extend(n.split("::").filter(|s| !s.is_empty()).map(str::to_string));
                out.push(m);
            }
            rest = &after[1.min(after.len())..];
        }
    }
    out
}

/// The violations among `files` (path relative to backend/src, contents).
fn violations(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (rel, text) in files {
        let module = module_of(rel);
        let Some((from_unit, from_rank)) = unit(&module) else {
            found.push(format!("{}: a file outside every layer (add it to the table)", rel.display()));
            continue;
        };
        for target in imports(&module, text) {
            // An item of the crate root (a re-export in lib.rs) or an unknown name is not a layer.
            let Some((to_unit, to_rank)) = unit(&target) else { continue };
            let ok = to_unit == from_unit || to_rank < from_rank || (from_rank == 6);
            if !ok {
                found.push(format!(
                    "{} ({from_unit}, layer {from_rank}) imports {} ({to_unit}, layer {to_rank})",
                    rel.display(),
                    target.join("::")
                ));
            }
        }
    }
    found
}

fn source_files(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read backend/src").flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            source_files(&p, root, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&p).expect("read a source file");
            out.push((p.strip_prefix(root).unwrap().to_path_buf(), text));
        }
    }
}

#[test]
fn every_file_imports_only_the_layers_below_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&root, &root, &mut files);
    assert!(files.iter().any(|(p, _)| p == Path::new("datapath/switch.rs")), "the data path was read");
    assert!(files.len() > 30, "every file was read: {}", files.len());
    let seen: usize = files.iter().map(|(p, t)| imports(&module_of(p), t).len()).sum();
    assert!(seen > 60, "the imports were read: {seen}");
    let v = violations(&files);
    assert!(v.is_empty(), "imports across the layers:\n{}", v.join("\n"));
}

#[test]
fn the_check_catches_a_data_path_file_that_names_a_layer_above() {
    let planted = |path: &str, text: &str| vec![(PathBuf::from(path), text.to_string())];
    let cases = [
        ("datapath/switch.rs", "use crate::ports::uplink::Uplink;"),
        ("datapath/deliver.rs", "use crate::services::dns::DnsService;"),
        ("datapath/port.rs", "fn f() { crate::runtime::spawn(); }"),
        ("datapath/inject.rs", "use crate::{config::Mode, control::Request};"),
        ("datapath/network.rs", "use super::super::metrics::render;"),
        ("ports/uplink/rx.rs", "use crate::services::dhcp::DhcpService;"),
        ("services/dns/tcp.rs", "use crate::ports::vhost::device::PortDevice;"),
        ("ports/vhost/conn.rs", "use super::super::uplink::Uplink;"),
        ("services/dhcp.rs", "use super::dns::DnsService;"),
        ("runtime/build.rs", "use crate::daemon::Daemon;"),
        ("control.rs", "use crate::daemon::Daemon;"),
    ];
    for (path, text) in cases {
        assert_eq!(violations(&planted(path, text)).len(), 1, "{path}: {text}");
    }
    // And lets through what the layers allow.
    let allowed = [
        ("datapath/switch.rs", "use super::deliver::deliver; use crate::config::Mode; // crate::ports in a comment"),
        ("services/dns/tcp.rs", "use super::{DnsService, QUERY_TIMEOUT}; use crate::datapath::{Inject, Port};"),
        ("ports/uplink/rx.rs", "use super::{Uplink, BATCH}; use crate::datapath::Inject;"),
        ("runtime/build.rs", "use crate::ports::uplink::Uplink; use crate::services::dhcp;"),
        ("daemon.rs", "use crate::runtime::Supervisor; crate::control::serve(l, s);"),
    ];
    for (path, text) in allowed {
        assert!(violations(&planted(path, text)).is_empty(), "{path}: {text}: {:?}", violations(&planted(path, text)));
    }
}
