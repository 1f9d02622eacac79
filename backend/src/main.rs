//! The `vunet` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vunet::config::{Config, PortMode};
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
    /// List the DHCP leases of a network (from the running daemon).
    DhcpLeases {
        /// Network name.
        network: String,
        #[command(flatten)]
        at: DaemonAt,
    },
    /// List the guest ports of a network with their state and counters.
    PortList {
        /// Network name.
        network: String,
        #[command(flatten)]
        at: DaemonAt,
    },
    /// List the networks of the running daemon.
    NetList {
        #[command(flatten)]
        at: DaemonAt,
    },
    /// Run the networks of a configuration file (or the embedded default network).
    Run {
        /// TOML configuration file. Without it vunet serves network "default" (isolated,
        /// 192.168.122.1/24) with four guest sockets in a runtime directory.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Directory for the default network's sockets (default: $XDG_RUNTIME_DIR/vunet,
        /// /run/vunet as root, else /tmp/vunet-UID).
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        runtime_dir: Option<PathBuf>,
    },
}

/// Where to find the running daemon: `--control`, else the `control_socket` of `--config`,
/// else /run/vunet/control.sock.
#[derive(clap::Args)]
struct DaemonAt {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// The daemon's configuration file (its control_socket is used).
    #[arg(short, long, value_name = "FILE", conflicts_with = "control")]
    config: Option<PathBuf>,
}

impl DaemonAt {
    fn path(&self) -> Result<PathBuf, String> {
        if let Some(p) = &self.control {
            return Ok(p.clone());
        }
        if let Some(c) = &self.config {
            let cfg = Config::load(c).map_err(|e| e.to_string())?;
            return cfg.control_socket.ok_or_else(|| format!("{}: no control_socket in this configuration", c.display()));
        }
        Ok(vunet::control::default_path())
    }
}

/// Sends a request to the daemon and prints the answer; errors are one line, exit 1.
fn client(at: &DaemonAt, req: &str) -> ExitCode {
    let r = at.path().and_then(|p| vunet::control::request(&p, req));
    match r {
        Ok(text) if text.starts_with("error: ") => {
            eprint!("vunet: {}", &text["error: ".len()..]);
            ExitCode::from(1)
        }
        Ok(text) => {
            print!("{text}");
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
    match cli.command {
        Command::DhcpLeases { network, at } => client(&at, &format!("dhcp-leases {network}")),
        Command::PortList { network, at } => client(&at, &format!("port-list {network}")),
        Command::NetList { at } => client(&at, "net-list"),
        Command::Run { config, runtime_dir } => match run(config.as_deref(), runtime_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(msg) => {
                eprintln!("vunet: {msg}");
                ExitCode::from(2)
            }
        },
    }
}

fn default_runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("vunet");
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/vunet")
    } else {
        PathBuf::from(format!("/tmp/vunet-{uid}"))
    }
}

fn run(config: Option<&Path>, runtime_dir: Option<PathBuf>) -> Result<(), String> {
    let cfg = match config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => {
            let dir = runtime_dir.unwrap_or_else(default_runtime_dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create runtime directory {}: {}", dir.display(), vunet::config::io_reason(&e)))?;
            Config::default_in(&dir)
        }
    };
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
    let mut sig: libc::c_int = 0;
    // SAFETY: both pointers are valid for the call.
    unsafe { libc::sigwait(&sigs, &mut sig) };
    eprintln!("vunet: signal {sig}, stopping");
    for n in &daemon.networks {
        for p in n.ports.read().unwrap_or_else(|e| e.into_inner()).iter() {
            eprintln!("vunet: network {:?} port {:?}: {}", n.name, p.name, p.counters.snapshot());
        }
    }
    for n in &cfg.networks {
        for p in n.ports.iter().filter(|p| p.mode == PortMode::Server && p.tap.is_none()) {
            let _ = std::fs::remove_file(&p.socket);
        }
    }
    if let Some(c) = &cfg.control_socket {
        let _ = std::fs::remove_file(c);
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
        s
    }
}

/// Tells the user where the sockets are and exactly how to connect QEMU to each.
fn print_summary(cfg: &Config) {
    for n in &cfg.networks {
        let gw = n.gateway.map(|(a, p)| format!(", gateway {a}/{p}")).unwrap_or_default();
        let guests = n.ports.iter().filter(|p| p.tap.is_none()).count();
        println!("network {:?}: mode {}{}, mtu {}, {} guest port(s)", n.name, n.mode.name(), gw, n.mtu, guests);
        if let Some(u) = &n.uplink {
            println!("  uplink {} on {}", u.kind.name(), u.interface);
        }
        for p in &n.ports {
            if let Some(tap) = &p.tap {
                println!("  port {}: tap {} on the host", p.name, tap);
            }
        }
        for (i, p) in n.ports.iter().filter(|p| p.tap.is_none()).enumerate() {
            let mac = p.mac.map(|m| vunet_switch::format_mac(&m)).unwrap_or_else(|| format!("52:54:00:00:00:{:02x}", i + 1));
            let chardev = match p.mode {
                PortMode::Server => format!("-chardev socket,id=vu0,path={}", p.socket.display()),
                PortMode::Client => format!("-chardev socket,id=vu0,path={},server=on,wait=off", p.socket.display()),
            };
            println!(
                "  port {} ({}): {}",
                p.name,
                if p.mode == PortMode::Server { "vunet listens" } else { "vunet connects" },
                p.socket.display()
            );
            println!(
                "    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on -machine memory-backend=mem {chardev} -netdev vhost-user,id=net0,chardev=vu0 -device virtio-net-pci,netdev=net0,mac={mac}"
            );
        }
    }
    if let Some(c) = &cfg.control_socket {
        println!("control socket: {} (vunet net-list --control {})", c.display(), c.display());
    }
    println!("(guest RAM must be shared: memory-backend-memfd with share=on. Under TCG with QEMU 7.2 add vectors=0 to -device.)");
    use std::io::Write;
    let _ = std::io::stdout().flush();
}
