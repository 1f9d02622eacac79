//! The `vunet` command.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vunet::config::{io_reason, Config, PortMode};
use vunet::control::Request;
use vunet::Daemon;

#[derive(Parser)]
#[command(
    name = "vunet",
    version,
    about = "A userspace virtual network for VMs: vhost-user guest ports, an internal switch, no kernel bridge"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the networks of a configuration file (or the embedded default network).
    #[command(after_help = "Signals: SIGINT/SIGTERM stop; SIGHUP re-reads --config and applies added and removed networks and ports.")]
    Run {
        /// TOML configuration file, or a libvirt network XML file. Without it vunet serves
        /// network "default" (isolated, 192.168.122.1/24, DHCP, DNS) with four guest sockets
        /// and the control socket in a runtime directory.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Directory for the default network's sockets (default: $XDG_RUNTIME_DIR/vunet,
        /// /run/vunet as root, else /tmp/vunet-UID).
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        runtime_dir: Option<PathBuf>,
        /// Only check: load and validate, print the summary and warnings, start nothing (as
        /// `vunet check`).
        #[arg(long)]
        check: bool,
    },
    /// Validate a configuration file as `vunet run` would, and start nothing (exit 0 or 2).
    ///
    /// Loads the TOML or libvirt XML file, looks for what the start would refuse on this host
    /// (without binding or creating anything), prints every warning and the summary `vunet run`
    /// would print. Useful before a SIGHUP: a socket the running daemon holds is fine.
    Check {
        /// TOML configuration file, or a libvirt network XML file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// List the networks of the running daemon: name, mode, gateway, uplink, state, ports.
    NetList {
        #[command(flatten)]
        at: DaemonAt,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the ports of a network: socket or interface, MAC, IP, connected or not,
    /// negotiated features, rx/tx frames and bytes, drops by reason.
    PortList {
        /// Network name.
        network: String,
        #[command(flatten)]
        at: DaemonAt,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List the DHCP leases of a network: MAC, IP, expiry, name.
    DhcpLeases {
        /// Network name.
        network: String,
        #[command(flatten)]
        at: DaemonAt,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a guest port to a running network (other ports are not disturbed).
    PortAdd {
        /// Network name.
        network: String,
        /// Port name.
        name: String,
        /// The vhost-user socket (default: NETWORK-NAME.sock in the daemon's socket directory:
        /// its socket_dir, else the control socket's directory). A path outside that directory
        /// is refused.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// The guest's MAC (offered to VMMs that read it; locks port security to it).
        #[arg(long)]
        mac: Option<String>,
        /// server: vunet listens (default); client: the VMM listens, vunet connects.
        #[arg(long, value_name = "server|client")]
        mode: Option<String>,
        #[command(flatten)]
        at: DaemonAt,
        /// Print the new port as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a port from a running network; only its guest is disconnected.
    PortDel {
        /// Network name.
        network: String,
        /// Port name.
        name: String,
        #[command(flatten)]
        at: DaemonAt,
    },
    /// Write the frames of one port (both directions) as pcap while traffic flows.
    Capture {
        /// Network name.
        network: String,
        /// Port name.
        port: String,
        /// Output file ("-" or none: standard output, e.g. `| tcpdump -r -`).
        #[arg(short = 'w', value_name = "FILE")]
        write: Option<PathBuf>,
        /// Stop after this many frames.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        duration: Option<u64>,
        #[command(flatten)]
        at: DaemonAt,
    },
    /// Convert a libvirt network definition (XML) to vunet's TOML and print it.
    ImportLibvirt {
        /// The libvirt network XML file (as `virsh net-dumpxml` writes it).
        file: PathBuf,
    },
}

/// Where to find the running daemon: `--control`, else the `control_socket` of `--config`,
/// else where `vunet run` without a configuration puts it ($XDG_RUNTIME_DIR/vunet, /run/vunet
/// as root, else /tmp/vunet-UID), then /run/vunet/control.sock.
#[derive(clap::Args)]
struct DaemonAt {
    /// The daemon's control socket (default: where `vunet run` without a configuration puts
    /// it, $XDG_RUNTIME_DIR/vunet, /run/vunet as root or /tmp/vunet-UID, then
    /// /run/vunet/control.sock).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The daemon's configuration file (its control_socket is used).
    #[arg(short, long, value_name = "FILE", conflicts_with = "control")]
    config: Option<PathBuf>,
}

impl DaemonAt {
    /// Connects to the daemon and sends `req`; returns the connection and the socket used.
    fn connect(&self, req: &Request) -> Result<(UnixStream, PathBuf), String> {
        let path = match (&self.control, &self.config) {
            (Some(p), _) => p.clone(),
            (None, Some(c)) => {
                let cfg = Config::load(c).map_err(|e| e.to_string())?;
                cfg.control_socket.ok_or_else(|| format!("{}: no control_socket in this configuration", c.display()))?
            }
            (None, None) => return vunet::control::connect_first(&default_control_places(), req),
        };
        vunet::control::connect(&path, req).map(|s| (s, path))
    }
}

/// Where the CLI looks for the daemon without `--control` or `--config`: where `vunet run`
/// without a configuration puts its control socket, then the system daemon's.
fn default_control_places() -> Vec<PathBuf> {
    let mut places = vec![default_runtime_dir().join("control.sock")];
    let system = vunet::control::default_path();
    if !places.contains(&system) {
        places.push(system);
    }
    places
}

/// Sends a request to the daemon and prints the answer as a table or JSON; errors are one
/// line, exit 1.
fn client(at: &DaemonAt, req: Request, json: bool) -> ExitCode {
    match at.connect(&req).and_then(|(conn, path)| vunet::control::read_answer(conn, &path)) {
        Ok(v) if json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(v) => {
            print!("{}", vunet::control::render(&req, &v));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vunet: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VUNET_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let one_line = |r: Result<(), String>, code: u8| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("vunet: {msg}");
            ExitCode::from(code)
        }
    };
    match cli.command {
        Command::NetList { at, json } => client(&at, Request::NetList, json),
        Command::PortList { network, at, json } => client(&at, Request::PortList { network }, json),
        Command::DhcpLeases { network, at, json } => client(&at, Request::DhcpLeases { network }, json),
        Command::PortAdd { network, name, socket, mac, mode, at, json } => {
            let socket = socket.map(|s| std::path::absolute(&s).unwrap_or(s));
            client(&at, Request::PortAdd { network, name, socket, mac, mode }, json)
        }
        Command::PortDel { network, name, at } => client(&at, Request::PortDel { network, name }, false),
        Command::Capture { network, port, write, count, duration, at } => {
            one_line(capture(&at, Request::Capture { network, port }, write.as_deref(), count, duration), 1)
        }
        Command::ImportLibvirt { file } => one_line(import_libvirt(&file), 2),
        Command::Check { config } => one_line(check(Some(&config), None), 2),
        Command::Run { config, runtime_dir, check: true } => one_line(check(config.as_deref(), runtime_dir), 2),
        Command::Run { config, runtime_dir, check: false } => one_line(run(config.as_deref(), runtime_dir), 2),
    }
}

fn import_libvirt(file: &Path) -> Result<(), String> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| format!("{name}: cannot read: {}", io_reason(&e)))?;
    let imported = vunet::libvirt::import(&text, &name)?;
    for w in &imported.warnings {
        eprintln!("vunet: warning: {w}");
    }
    print!("{}", imported.toml);
    Ok(())
}

/// Copies a port's pcap stream to a file or standard output, frame by frame (so the file is
/// readable at any moment), until `count` frames or `duration` seconds.
fn capture(at: &DaemonAt, req: Request, out: Option<&Path>, count: Option<u64>, duration: Option<u64>) -> Result<(), String> {
    use std::io::BufRead;
    let (conn, path) = at.connect(&req)?;
    if let Some(d) = duration {
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(d.max(1))));
    }
    let deadline = duration.map(|d| std::time::Instant::now() + std::time::Duration::from_secs(d));
    let mut r = std::io::BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("control socket {}: {}", path.display(), vunet::config::io_reason(&e)))?;
    let v: serde_json::Value = serde_json::from_str(line.trim()).map_err(|_| format!("control socket {}: bad answer", path.display()))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(e.to_string());
    }
    let sink: Box<dyn std::io::Write> = match out {
        Some(p) if p != Path::new("-") => {
            Box::new(std::fs::File::create(p).map_err(|e| format!("{}: {}", p.display(), vunet::config::io_reason(&e)))?)
        }
        _ => Box::new(std::io::stdout()),
    };
    let mut reader = pcap_file::pcap::PcapReader::new(r).map_err(|e| format!("capture stream: {e}"))?;
    let mut writer = pcap_file::pcap::PcapWriter::with_header(sink, reader.header()).map_err(|e| format!("capture output: {e}"))?;
    let mut n = 0u64;
    while count.is_none_or(|c| n < c) && deadline.is_none_or(|d| std::time::Instant::now() < d) {
        match reader.next_packet() {
            Some(Ok(p)) => {
                writer.write_packet(&p).map_err(|e| format!("capture output: {e}"))?;
                n += 1;
            }
            // The daemon went away, or the duration's read timeout passed.
            Some(Err(_)) | None => break,
        }
    }
    eprintln!("vunet: {n} frames captured");
    Ok(())
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Where `vunet run` without a configuration puts its sockets, and so where the CLI looks
/// first: $XDG_RUNTIME_DIR/vunet, /run/vunet as root, else a private directory in /tmp.
fn default_runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vunet");
    }
    match uid() {
        0 => PathBuf::from("/run/vunet"),
        uid => private_tmp_dir(uid),
    }
}

fn private_tmp_dir(uid: u32) -> PathBuf {
    PathBuf::from(format!("/tmp/vunet-{uid}"))
}

/// Creates the runtime directory. The per-user fallback lives in /tmp, where anybody could
/// have created it first: see `make_private_dir`.
fn make_runtime_dir(dir: &Path) -> Result<(), String> {
    let uid = uid();
    if dir != private_tmp_dir(uid) {
        return std::fs::create_dir_all(dir).map_err(|e| format!("cannot create runtime directory {}: {}", dir.display(), io_reason(&e)));
    }
    make_private_dir(dir, uid)
}

/// Creates `dir` owner-only (0700), or takes the one there if it is a real directory (not a
/// link) of user `uid` that nobody else may write to; anything else is refused in one line,
/// never used. Checked on an fd opened without following a link, so the directory checked
/// is the one whose mode is tightened.
fn make_private_dir(dir: &Path, uid: u32) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    let cannot = |e: std::io::Error| format!("cannot create runtime directory {}: {}", dir.display(), io_reason(&e));
    let refuse = |why: String| format!("runtime directory {} {why} (remove it, or use --runtime-dir DIR)", dir.display());
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(cannot(e)),
        _ => {}
    }
    let fd = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW).open(dir) {
        Ok(fd) => fd,
        // A link gives ELOOP or ENOTDIR (O_DIRECTORY is looked at first); lstat tells which.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            let link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            return Err(refuse(if link { "is a symbolic link, not a directory" } else { "is not a directory" }.into()));
        }
        Err(e) => return Err(cannot(e)),
    };
    let m = fd.metadata().map_err(cannot)?;
    if m.uid() != uid {
        return Err(refuse(format!("belongs to uid {}, not to you", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(refuse(format!("may be written by others (mode {:o})", m.mode() & 0o777)));
    }
    if m.mode() & 0o077 != 0 {
        fd.set_permissions(std::fs::Permissions::from_mode(0o700)).map_err(cannot)?;
    }
    Ok(())
}

/// The configuration `vunet run` serves: the file, or the embedded default in the runtime
/// directory (created only when `create`: a check creates nothing).
fn load(config: Option<&Path>, runtime_dir: Option<PathBuf>, create: bool) -> Result<Config, String> {
    match config {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => {
            let dir = runtime_dir.unwrap_or_else(default_runtime_dir);
            if create {
                make_runtime_dir(&dir)?;
            }
            Ok(Config::default_in(&dir))
        }
    }
}

/// `vunet check` / `vunet run --check`: what `run` would print, and its refusals, with nothing
/// started, bound or created.
fn check(config: Option<&Path>, runtime_dir: Option<PathBuf>) -> Result<(), String> {
    let cfg = load(config, runtime_dir, false)?;
    for w in &cfg.warnings {
        eprintln!("vunet: warning: {w}");
    }
    // The embedded default's sockets go in the runtime directory `run` creates: nothing on the
    // host to look at yet.
    if config.is_some() {
        Daemon::check(&cfg).map_err(|e| e.to_string())?;
    }
    print_summary(&cfg);
    let what = config.map(|c| c.display().to_string()).unwrap_or_else(|| "the embedded default".into());
    println!("{what}: valid, {} warning(s); nothing was started", cfg.warnings.len());
    Ok(())
}

fn run(config: Option<&Path>, runtime_dir: Option<PathBuf>) -> Result<(), String> {
    let cfg = load(config, runtime_dir, true)?;
    for w in &cfg.warnings {
        eprintln!("vunet: warning: {w}");
    }
    // Block the stop signals before any thread exists, so every thread inherits the mask and
    // the main thread alone takes them with sigwait.
    let sigs = stop_signals();
    // SAFETY: `sigs` is an initialised sigset; pthread_sigmask only reads it.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigs, std::ptr::null_mut()) };
    let daemon = Daemon::start(&cfg).map_err(|e| e.to_string())?;
    print_summary(&cfg);
    let mut cfg = cfg;
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: both pointers are valid for the call.
        unsafe { libc::sigwait(&sigs, &mut sig) };
        if sig != libc::SIGHUP {
            eprintln!("vunet: signal {sig}, stopping");
            break;
        }
        let Some(path) = config else {
            eprintln!("vunet: SIGHUP: no configuration file to re-read (started without --config)");
            continue;
        };
        match Config::load(path) {
            Ok(new) => {
                for w in &new.warnings {
                    eprintln!("vunet: warning: {w}");
                }
                for line in daemon.apply(&new) {
                    eprintln!("vunet: reload: {line}");
                }
                eprintln!("vunet: reload of {} done", path.display());
                cfg.networks = new.networks;
            }
            Err(e) => eprintln!("vunet: reload refused, nothing changed: {e}"),
        }
    }
    for n in daemon.networks() {
        for p in n.live_ports() {
            eprintln!("vunet: network {:?} port {:?}: {}", n.name, p.name, p.counters.snapshot());
        }
    }
    for n in daemon.networks() {
        for p in n.live_ports().iter().filter(|p| p.mode == PortMode::Server && p.kind == vunet::PortKind::Vhost) {
            let _ = std::fs::remove_file(&p.socket);
        }
    }
    if let Some(c) = &cfg.control_socket {
        let _ = std::fs::remove_file(c);
    }
    for e in daemon.save_leases() {
        eprintln!("vunet: {e}");
    }
    drop(daemon);
    Ok(())
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset takes valid signal numbers.
    unsafe {
        let mut s: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut s);
        libc::sigaddset(&mut s, libc::SIGINT);
        libc::sigaddset(&mut s, libc::SIGTERM);
        libc::sigaddset(&mut s, libc::SIGHUP);
        s
    }
}

/// Tells the user where the sockets are and exactly how to connect QEMU to each.
fn print_summary(cfg: &Config) {
    for note in &cfg.notes {
        println!("{note}");
    }
    for n in &cfg.networks {
        // The gateway's services are on wherever there is a gateway: DNS always, DHCP if set.
        let gw = n.gateway.map(|(a, p)| format!(", gateway {a}/{p}")).unwrap_or_default();
        let dhcp = n.dhcp.as_ref().map(|d| format!(", DHCP {}-{}", d.range.0, d.range.1)).unwrap_or_default();
        let dns = if n.gateway.is_some() { ", DNS" } else { "" };
        let guests = n.ports.iter().filter(|p| p.tap.is_none()).count();
        println!("network {:?}: mode {}{gw}{dhcp}{dns}, mtu {}, {} guest port(s)", n.name, n.mode.name(), n.mtu, guests);
        match n.uplink.as_ref().map(|u| (u, &u.vxlan)) {
            Some((_, Some(v))) => {
                let remotes: Vec<String> = v.remotes.iter().map(|r| r.to_string()).collect();
                let group = v.group.map(|g| format!(", group {g}")).unwrap_or_default();
                println!("  uplink vxlan: VNI {} on {}:{}, remotes {}{group}", v.vni, v.local, v.port, remotes.join(" "));
            }
            Some((u, None)) => println!("  uplink {} on {}", u.kind.name(), u.interface),
            None => {}
        }
        if let Some(s) = &n.socket_nat {
            println!(
                "  out through the host's sockets (socket NAT): up to {} TCP connections, {} per guest; host loopback {}",
                s.max_connections,
                s.max_per_guest,
                if s.host_loopback { "reachable at the gateway address" } else { "not reachable" }
            );
            for f in &s.forwards {
                let proto = if f.proto == vunet_switch::proto::IPPROTO_TCP { "tcp" } else { "udp" };
                let listen = match f.listen {
                    Some(std::net::IpAddr::V6(a)) => format!("[{a}]"),
                    Some(a) => a.to_string(),
                    None => "*".into(),
                };
                let ports = |lo: u16, hi: u16| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") };
                let last = f.guest_port + (f.external.1 - f.external.0);
                println!("  forward {proto} {listen}:{} -> {}:{}", ports(f.external.0, f.external.1), f.guest, ports(f.guest_port, last));
            }
        }
        for p in &n.ports {
            if let Some(tap) = &p.tap {
                println!("  port {}: tap {} on the host", p.name, tap);
            }
        }
        // QEMU offers the guest its own MTU setting, not the backend's: say it when not 1500.
        let host_mtu = if n.mtu != 1500 { format!(",host_mtu={}", n.mtu) } else { String::new() };
        for (i, p) in n.ports.iter().filter(|p| p.tap.is_none()).enumerate() {
            let mac = p.mac.map(|m| vunet_switch::format_mac(&m)).unwrap_or_else(|| format!("52:54:00:00:00:{:02x}", i + 1));
            let chardev = match p.mode {
                PortMode::Server => format!("-chardev socket,id=vu0,path={}", p.socket.display()),
                PortMode::Client => format!("-chardev socket,id=vu0,path={},server=on,wait=off", p.socket.display()),
            };
            // Who may connect to a socket vunet binds: QEMU run by another user needs the group.
            let perms = match (p.mode, p.socket_group) {
                (PortMode::Client, _) => String::new(),
                (PortMode::Server, None) => format!(" (mode {:04o})", p.effective_socket_mode()),
                (PortMode::Server, Some(g)) => format!(" (mode {:04o}, group {g})", p.effective_socket_mode()),
            };
            println!(
                "  port {} ({}): {}{perms}",
                p.name,
                if p.mode == PortMode::Server { "vunet listens" } else { "vunet connects" },
                p.socket.display()
            );
            println!(
                "    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem {chardev} -netdev vhost-user,id=net0,chardev=vu0 -device virtio-net-pci,netdev=net0,mac={mac}{host_mtu}"
            );
        }
    }
    if let Some(c) = &cfg.control_socket {
        let who = cfg.control_group.as_ref().map(|g| format!("owner and group {g}")).unwrap_or_else(|| "owner-only".into());
        // Say whether the bare CLI finds this daemon, or how to name it.
        if default_control_places().contains(c) {
            println!("control socket: {} ({who}; `vunet net-list` finds it with no flags)", c.display());
        } else {
            println!("control socket: {} ({who}; vunet net-list --control {})", c.display(), c.display());
        }
    }
    println!("(guest RAM must be shared: memory-backend-memfd with share=on. Under TCG with QEMU 7.2 add vectors=0 to -device.)");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    #[test]
    fn the_private_runtime_directory_is_ours_alone_or_refused() {
        let base = std::env::temp_dir().join(format!("vunet-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let me = uid();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;

        // Made 0700; taken again as it is.
        let fresh = base.join("fresh");
        make_private_dir(&fresh, me).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        make_private_dir(&fresh, me).unwrap();
        // Ours, readable by others: tightened.
        let loose = base.join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        make_private_dir(&loose, me).unwrap();
        assert_eq!(mode(&loose), 0o700);

        // Writable by others: somebody may have put sockets in it. Refused, left alone.
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            make_private_dir(&open, me).unwrap_err(),
            format!("runtime directory {} may be written by others (mode 777) (remove it, or use --runtime-dir DIR)", open.display())
        );
        assert_eq!(mode(&open), 0o777);
        let group = base.join("group");
        std::fs::create_dir(&group).unwrap();
        std::fs::set_permissions(&group, std::fs::Permissions::from_mode(0o770)).unwrap();
        assert!(make_private_dir(&group, me).unwrap_err().contains("may be written by others (mode 770)"));

        // A link to a directory of ours, a file, another user's directory: refused.
        let link = base.join("link");
        std::os::unix::fs::symlink(&fresh, &link).unwrap();
        assert_eq!(
            make_private_dir(&link, me).unwrap_err(),
            format!("runtime directory {} is a symbolic link, not a directory (remove it, or use --runtime-dir DIR)", link.display())
        );
        let file = base.join("file");
        std::fs::write(&file, "").unwrap();
        assert!(make_private_dir(&file, me).unwrap_err().ends_with("is not a directory (remove it, or use --runtime-dir DIR)"));
        assert!(make_private_dir(&fresh, me + 1).unwrap_err().contains(&format!("belongs to uid {me}, not to you")));
        let _ = std::fs::remove_dir_all(&base);
    }
}
