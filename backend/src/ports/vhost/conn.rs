//! A vhost-user port's connections: the socket it listens on (server mode) or connects to
//! (client mode), and the thread that serves one VMM connection after another for as long as
//! the port exists, each with a fresh device and vhost-user daemon behind the relay.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use thiserror::Error;
use tracing::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vunet_switch::format_mac;
use vunet_switch::vnet::HDR_LEN;

use super::device::PortDevice;
use crate::config::{io_reason, PortConfig};
use crate::datapath::{GuestMem, Network, Port};

/// Why a server-mode socket cannot be bound: a user mistake, printed as one line.
#[derive(Debug, Error)]
pub enum BindError {
    #[error("port {port}: socket {path}: directory does not exist")]
    NoDirectory { port: String, path: PathBuf },
    #[error("port {port}: socket {path} is in use by another process")]
    SocketInUse { port: String, path: PathBuf },
    #[error("port {port}: {path} exists and is not a socket")]
    NotASocket { port: String, path: PathBuf },
    #[error("port {port}: cannot listen on {path}: {reason}")]
    Listen { port: String, path: PathBuf, reason: String },
}

/// Binds a server-mode socket with the port's mode and group, refusing to steal one a live
/// process is listening on and replacing a stale one left by a crash.
pub fn bind_socket(p: &PortConfig) -> Result<UnixListener, BindError> {
    let (path, port) = (&p.socket, p.name.clone());
    if check_socket(p)? && UnixStream::connect(path).is_ok() {
        return Err(BindError::SocketInUse { port, path: path.clone() });
    }
    let listen = |reason: String| BindError::Listen { port: p.name.clone(), path: path.clone(), reason };
    let mode = p.effective_socket_mode();
    bind_private(path, mode, p.socket_group).map_err(|(step, e)| listen(format!("{step}{}", io_reason(&e))))
}

/// Binds a listening unix socket at `path` with `mode` and group `gid`, never reachable with
/// looser permissions: it is bound in a private (0700) directory next to its path, given its
/// group and mode there, and renamed into place (over a stale socket, atomically), so nothing
/// is changed through a path another user could swap for a symlink. The directory is on the
/// same file system, so the rename cannot fail for crossing one. An error says which step
/// failed ("" for the bind itself).
pub fn bind_private(path: &Path, mode: u32, gid: Option<u32>) -> Result<UnixListener, (String, std::io::Error)> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = staging_dir(dir).map_err(|e| (format!("cannot create a private directory in {}: ", dir.display()), e))?;
    let staged = staging.join("s");
    let result = (|| {
        let l = UnixListener::bind(&staged).map_err(|e| (String::new(), e))?;
        if let Some(gid) = gid {
            std::os::unix::fs::lchown(&staged, None, Some(gid)).map_err(|e| (format!("cannot give the socket group {gid}: "), e))?;
        }
        // By path, but inside the private directory no one else can enter.
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
            .map_err(|e| (format!("cannot set mode {mode:04o}: "), e))?;
        std::fs::rename(&staged, path).map_err(|e| (String::new(), e))?;
        Ok(l)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    let _ = std::fs::remove_dir(&staging);
    result
}

/// A new private (0700) directory in `dir`, with a short name so that the staged socket's
/// path stays within the 107 bytes a unix socket address holds.
fn staging_dir(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::AtomicU32;
    static SEQ: AtomicU32 = AtomicU32::new(0);
    loop {
        let d = dir.join(format!(".vu{}.{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            r => return r.map(|()| d),
        }
    }
}

/// What `bind_socket` would refuse, found without binding or removing anything: a directory
/// that does not exist, a path taken by another kind of file. Returns whether a socket is
/// there already (stale, or held by a running vunet).
pub fn check_socket(p: &PortConfig) -> Result<bool, BindError> {
    use std::os::unix::fs::FileTypeExt;
    let path = &p.socket;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(BindError::NoDirectory { port: p.name.clone(), path: path.clone() });
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => Err(BindError::NotASocket { port: p.name.clone(), path: path.clone() }),
        Ok(_) => Ok(true),
        Err(_) => Ok(false),
    }
}

/// Waits for the next VMM connection: accepted on the port's socket (server mode), or made to
/// the VMM's socket, retried every 100 ms (client mode).
fn next_frontend(net: &Network, port: &Port, listener: Option<&UnixListener>) -> Option<UnixStream> {
    let mut waiting_logged = false;
    loop {
        if port.removed.load(Ordering::Acquire) {
            return None;
        }
        let r = match listener {
            Some(l) => l.accept().map(|(s, _)| s),
            None => UnixStream::connect(&port.socket),
        };
        match r {
            Ok(s) => return Some(s),
            Err(e) => {
                if !waiting_logged {
                    match listener {
                        Some(_) => {
                            warn!(network = %net.name, port = %port.name, "accept failed: {}", io_reason(&e))
                        }
                        None => {
                            info!(network = %net.name, port = %port.name, socket = %port.socket.display(), "waiting for the VMM to listen on the socket ({})", io_reason(&e))
                        }
                    }
                    waiting_logged = true;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Waits for connection `id` to end, then forgets what it leaves behind: its RX rings if they
/// are the ones senders use, and the guest's state if no other connection of the port remains
/// (a live migration's other end).
fn serve_connection(net: &Network, port: &Port, id: u64, device: Arc<PortDevice>, mut daemon: VhostUserDaemon<Arc<PortDevice>>) {
    let result = daemon.wait();
    device.forget_rings();
    let others = port.live_conns.fetch_sub(1, Ordering::AcqRel) - 1;
    // The guest is gone: nobody may write into its memory any more, and what was learned
    // behind this port is stale, unless the guest lives on in another connection (migrated
    // to it, or its migration to it failed and it stayed here).
    if port.rx_owner.load(Ordering::Acquire) == id || others == 0 {
        port.unpublish_rx();
    }
    if others == 0 {
        port.connected.store(false, Ordering::Release);
        port.forget_guest();
        net.macs.lock().unwrap_or_else(|e| e.into_inner()).forget_port(port.id);
    }
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    let counters = port.counters.snapshot();
    match result {
        Ok(()) => {
            info!(network = %net.name, port = %port.name, conn = id, "guest disconnected; port totals: {counters}")
        }
        Err(e) => {
            info!(network = %net.name, port = %port.name, conn = id, "guest disconnected ({e}); port totals: {counters}")
        }
    }
    if let Some(m) = port.mac {
        debug!(port = %port.name, mac = %format_mac(&m), "port ready for a new connection");
    }
    port.conn.lock().unwrap_or_else(|e| e.into_inner()).retain(|(c, _)| *c != id);
}

/// What a SEND_RARP from the port's VMM does (after a live migration): the guest's MAC moves
/// here from a port whose VMM stopped its rings (`Network::take_migrated_mac`; a request of
/// the VMM, never a guest frame, moves a MAC between ports), then a RARP broadcast with it is
/// switched as if the guest sent it, which tells the rest of the network (other guests,
/// uplinks, other hosts) where the guest is now.
fn rarp_handler(net: &Arc<Network>, port: &Arc<Port>) -> Box<dyn Fn([u8; 6]) + Send> {
    let (net, port) = (net.clone(), port.clone());
    Box::new(move |mac| {
        info!(network = %net.name, port = %port.name, mac = %format_mac(&mac), "VMM announces the guest (SEND_RARP)");
        if port.security {
            net.take_migrated_mac(&port, mac);
        }
        let frame = rarp_frame(mac);
        crate::datapath::Inject::new(net.clone()).switch_from_link(&port, &[(&frame, false)], HDR_LEN);
    })
}

/// A RARP request from `mac` (what QEMU broadcasts itself for a migrated NIC), behind a zero
/// virtio-net header of HDR_LEN bytes.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN + 60];
    let e = &mut f[HDR_LEN..];
    e[..6].copy_from_slice(&[0xff; 6]);
    e[6..12].copy_from_slice(&mac);
    e[12..14].copy_from_slice(&[0x80, 0x35]);
    // Ethernet, IPv4, 6-byte and 4-byte addresses, opcode 3 (reverse request).
    e[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 3]);
    e[22..28].copy_from_slice(&mac);
    e[32..38].copy_from_slice(&mac);
    f
}

/// Serves one port forever: one vhost-user connection after another, each with a fresh
/// device and daemon. In server mode the next connection is accepted while one is served: the
/// destination QEMU of a live migration on the same host connects to the same socket while
/// the source still holds it, and must finish its handshake before the migration can start.
pub fn serve_port(net: Arc<Network>, port: Arc<Port>, listener: Option<UnixListener>, mut internal: Listener, internal_path: PathBuf) {
    loop {
        let Some(frontend) = next_frontend(&net, &port, listener.as_ref()) else { break };
        if port.removed.load(Ordering::Acquire) {
            break;
        }
        let id = port.connections.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(c) = frontend.try_clone() {
            port.conn.lock().unwrap_or_else(|e| e.into_inner()).push((id, c));
        }
        let mem: GuestMem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let started = PortDevice::new(net.clone(), port.clone(), mem.clone(), id)
            .map_err(|e| e.to_string())
            .and_then(|d| {
                let d = Arc::new(d);
                VhostUserDaemon::new(format!("vu-{}", port.name), d.clone(), mem).map(|daemon| (d, daemon)).map_err(|e| e.to_string())
            })
            .and_then(|(d, mut daemon)| {
                let backend_end = UnixStream::connect(&internal_path).map_err(|e| e.to_string())?;
                super::relay::spawn(frontend, backend_end, &port.name, rarp_handler(&net, &port)).map_err(|e| e.to_string())?;
                match daemon.start(&mut internal) {
                    Ok(()) => Ok((d, daemon)),
                    Err(e) => {
                        d.notify_exit();
                        Err(e.to_string())
                    }
                }
            });
        let (device, daemon) = match started {
            Ok(x) => x,
            Err(e) => {
                port.conn.lock().unwrap_or_else(|e| e.into_inner()).retain(|(c, _)| *c != id);
                warn!(network = %net.name, port = %port.name, "cannot serve the connection: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        port.live_conns.fetch_add(1, Ordering::AcqRel);
        port.connected.store(true, Ordering::Release);
        info!(network = %net.name, port = %port.name, conn = id, "guest connected");
        if listener.is_some() {
            let (n, p) = (net.clone(), port.clone());
            let spawned =
                thread::Builder::new().name(format!("vu-conn-{}", port.name)).spawn(move || serve_connection(&n, &p, id, device, daemon));
            if let Err(e) = spawned {
                warn!(network = %net.name, port = %port.name, "cannot start a thread for the connection: {e}");
            }
        } else {
            // Client mode: the VMM's socket takes one connection; the next is made when this one ends.
            serve_connection(&net, &port, id, device, daemon);
            thread::sleep(Duration::from_millis(100));
        }
        if port.removed.load(Ordering::Acquire) {
            break;
        }
    }
    debug!(network = %net.name, port = %port.name, "port thread ends");
}
