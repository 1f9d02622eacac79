//! Guest sockets' permissions: the mode and group `socket_mode`/`socket_group` ask for, not the
//! process umask's, on sockets bound at start and at run time.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use vunet_tests::*;

/// A group the socket can be given that is not the process's own, so that the group seen
/// afterwards is the configured one, not the default: `nogroup` as root, else one of the
/// process's supplementary groups. `None` when there is none (only the modes are checked).
fn other_group() -> Option<(String, u32)> {
    // SAFETY: plain getters.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid == 0 {
        return vunet::config::group_id("nogroup").filter(|g| *g != egid).map(|g| ("nogroup".into(), g));
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    // SAFETY: `groups` holds 256 entries.
    let n = unsafe { libc::getgroups(groups.len() as i32, groups.as_mut_ptr()) };
    groups.truncate(n.max(0) as usize);
    groups.into_iter().find(|g| *g != egid).map(|g| (g.to_string(), g))
}

fn mode_and_gid(p: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()), "{} is a socket", p.display());
    (m.permissions().mode() & 0o7777, m.gid())
}

#[test]
fn guest_sockets_get_the_configured_mode_and_group_whatever_the_umask() {
    // A umask that would leave the sockets open to everyone: what they get must come from
    // the configuration alone.
    // SAFETY: umask only sets the process's mask; this file's only test changes it.
    unsafe { libc::umask(0) };
    let dir = TempDir::new("socket-perms");
    let group = other_group();
    let group_line = group.as_ref().map(|(name, _)| format!("socket_group = \"{name}\"\n")).unwrap_or_default();
    // A stale socket where `own` goes, as a crash leaves it: replaced with the asked mode.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("own.sock")).unwrap());
    let toml = format!(
        "[[network]]\nname = \"grouped\"\nmode = \"bridge\"\n{group_line}\
         [[network.port]]\nname = \"inherits\"\nsocket = \"inherits.sock\"\n\
         [[network.port]]\nname = \"own\"\nsocket = \"own.sock\"\nsocket_mode = \"0640\"\n\
         [[network]]\nname = \"plain\"\nmode = \"bridge\"\n\
         [[network.port]]\nname = \"default\"\nsocket = \"default.sock\"\n"
    );
    let cfg = vunet::Config::parse(&toml, "perms.toml", dir.path()).expect("config");
    let d = vunet::Daemon::start(&cfg).expect("start");
    let gid = group.as_ref().map(|(_, g)| *g);
    // SAFETY: plain getter.
    let egid = unsafe { libc::getegid() };
    let want_grouped = if gid.is_some() { 0o660 } else { 0o600 };
    assert_eq!(mode_and_gid(&dir.path().join("inherits.sock")), (want_grouped, gid.unwrap_or(egid)), "the network's group");
    assert_eq!(mode_and_gid(&dir.path().join("own.sock")), (0o640, gid.unwrap_or(egid)), "the port's own mode");
    assert_eq!(mode_and_gid(&dir.path().join("default.sock")), (0o600, egid), "owner-only by default");
    // A port added at run time takes its network's settings.
    let net = d.network("grouped").unwrap();
    let added = dir.path().join("added.sock");
    let p = vunet::config::PortConfig {
        name: "added".into(),
        socket: added.clone(),
        tap: None,
        mode: vunet::PortMode::Server,
        mac: None,
        port_security: None,
        queues: 1,
        socket_mode: None,
        socket_group: None,
        isolated: false,
        bandwidth: Default::default(),
        vlan: Default::default(),
    };
    d.shared.add_port(&net, p).expect("port-add");
    assert_eq!(mode_and_gid(&added), (want_grouped, gid.unwrap_or(egid)), "port-add");
    // The sockets work, and the private directories they were bound in are gone.
    let vm = VmSim::connect(&dir.path().join("own.sock"), SimOptions::full()).expect("connect to the renamed socket");
    assert!(vm.is_connected());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with(".vu"))
        .collect();
    assert!(left.is_empty(), "staging directories left behind: {left:?}");
    if group.is_none() {
        eprintln!("no group other than the process's own: only the modes were checked");
    }
}
