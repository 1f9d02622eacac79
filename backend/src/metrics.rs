//! The port counters in Prometheus text format (`metrics_listen = "127.0.0.1:9477"`), served
//! over plain HTTP/1.0 at `/metrics`: one short-lived connection per scrape.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vunet_switch::counters::DropReason;

use crate::datapath::{unix_now, Network};
use crate::runtime::Supervisor;
use crate::services::socknat::SocketNat;

/// Binds the listen address and serves scrapes on a thread of their own.
pub fn start(addr: SocketAddr, shared: Arc<Supervisor>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for conn in listener.incoming().flatten() {
            serve(conn, &shared);
        }
    })?;
    Ok(())
}

fn serve(mut conn: TcpStream, shared: &Supervisor) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if BufReader::new((&conn).take(1024)).read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/metrics" || path.starts_with("/metrics?") {
        let networks = shared.networks();
        let nats: Vec<_> = networks.iter().filter_map(|n| Some((n.name.clone(), shared.socket_nat(&n.name)?))).collect();
        ("200 OK", render(&networks, &nats))
    } else {
        ("404 Not Found", "only /metrics is here\n".to_string())
    };
    let _ = write!(conn, "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}", body.len());
}

/// A label value with `\`, `"` and newlines escaped.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One counter of a port's snapshot.
type Counter = fn(&vunet_switch::counters::CounterSnapshot) -> u64;

/// The exposition text for every network and live port.
pub fn render(networks: &[Arc<Network>], nats: &[(String, Arc<SocketNat>)]) -> String {
    let mut out = String::new();
    let counters: [(&str, &str, Counter); 4] = [
        ("vunet_port_rx_frames_total", "Frames the switch received from the port.", |c| c.rx_frames),
        ("vunet_port_rx_bytes_total", "Bytes the switch received from the port.", |c| c.rx_bytes),
        ("vunet_port_tx_frames_total", "Frames the switch delivered to the port.", |c| c.tx_frames),
        ("vunet_port_tx_bytes_total", "Bytes the switch delivered to the port.", |c| c.tx_bytes),
    ];
    let ports: Vec<_> = networks.iter().flat_map(|n| n.live_ports().into_iter().map(move |p| (n.name.clone(), p))).collect();
    let snaps: Vec<_> = ports.iter().map(|(_, p)| p.counters.snapshot()).collect();
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for ((net, p), c) in ports.iter().zip(&snaps) {
            let _ = writeln!(out, "{name}{{network=\"{}\",port=\"{}\"}} {}", esc(net), esc(&p.name), get(c));
        }
    }
    let _ = writeln!(out, "# HELP vunet_port_drops_total Frames dropped at the port, by reason.\n# TYPE vunet_port_drops_total counter");
    for ((net, p), c) in ports.iter().zip(&snaps) {
        for (r, n) in DropReason::ALL.iter().zip(c.drops.iter()) {
            let _ =
                writeln!(out, "vunet_port_drops_total{{network=\"{}\",port=\"{}\",reason=\"{}\"}} {n}", esc(net), esc(&p.name), r.name());
        }
    }
    let _ = writeln!(out, "# HELP vunet_port_connected Whether a guest (or the uplink) is attached.\n# TYPE vunet_port_connected gauge");
    for (net, p) in &ports {
        let _ = writeln!(
            out,
            "vunet_port_connected{{network=\"{}\",port=\"{}\"}} {}",
            esc(net),
            esc(&p.name),
            p.connected.load(Ordering::Relaxed) as u8
        );
    }
    let _ = writeln!(out, "# HELP vunet_dhcp_leases Active DHCP leases of the network.\n# TYPE vunet_dhcp_leases gauge");
    for n in networks {
        if let Some(d) = &n.dhcp {
            let leases = d.lock().unwrap_or_else(|e| e.into_inner()).leases(unix_now()).len();
            let _ = writeln!(out, "vunet_dhcp_leases{{network=\"{}\"}} {leases}", esc(&n.name));
        }
    }
    let _ = writeln!(out, "# HELP vunet_gateway_drops_total Frames the gateway's services dropped after port security (malformed ND, ...), by reason.\n# TYPE vunet_gateway_drops_total counter");
    for n in networks {
        for (why, v) in n.services.iter().flat_map(|s| s.drops()) {
            let _ = writeln!(out, "vunet_gateway_drops_total{{network=\"{}\",reason=\"{why}\"}} {v}", esc(&n.name));
        }
    }
    let _ = writeln!(out, "# HELP vunet_worker_handoffs_total Guest TX kicks that found all of the network's `workers` busy and left their ring to one of them.\n# TYPE vunet_worker_handoffs_total counter");
    for n in networks {
        let _ = writeln!(out, "vunet_worker_handoffs_total{{network=\"{}\"}} {}", esc(&n.name), n.tx_workers.handoffs());
    }
    let sums: Vec<_> = nats.iter().map(|(n, s)| (n, s.summary())).collect();
    let _ = writeln!(out, "# HELP vunet_socket_nat_flows Open socket-NAT flows, by protocol.\n# TYPE vunet_socket_nat_flows gauge");
    for (n, s) in &sums {
        for (proto, v) in [("tcp", s.tcp_flows), ("udp", s.udp_flows), ("icmp", s.icmp_flows)] {
            let _ = writeln!(out, "vunet_socket_nat_flows{{network=\"{}\",proto=\"{proto}\"}} {v}", esc(n));
        }
    }
    let _ = writeln!(out, "# HELP vunet_socket_nat_ipv6_flows Open socket-NAT flows over IPv6 (included in vunet_socket_nat_flows), by protocol.\n# TYPE vunet_socket_nat_ipv6_flows gauge");
    for (n, s) in &sums {
        for (proto, v) in [("tcp", s.tcp6_flows), ("udp", s.udp6_flows), ("icmp", s.icmp6_flows)] {
            let _ = writeln!(out, "vunet_socket_nat_ipv6_flows{{network=\"{}\",proto=\"{proto}\"}} {v}", esc(n));
        }
    }
    let _ = writeln!(out, "# HELP vunet_socket_nat_events_total Socket-NAT connections refused, unreachable, accepted on forwards.\n# TYPE vunet_socket_nat_events_total counter");
    for (n, s) in &sums {
        for (ev, v) in [("refused", s.refused), ("unreachable", s.unreachable), ("forward_accepted", s.forward_accepted)] {
            let _ = writeln!(out, "vunet_socket_nat_events_total{{network=\"{}\",event=\"{ev}\"}} {v}", esc(n));
        }
    }
    let _ = writeln!(out, "# HELP vunet_socket_nat_drops_total Socket-NAT drops, by reason.\n# TYPE vunet_socket_nat_drops_total counter");
    for (n, s) in &sums {
        for (why, v) in &s.drops {
            let _ = writeln!(out, "vunet_socket_nat_drops_total{{network=\"{}\",reason=\"{why}\"}} {v}", esc(n));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::config::Mode;
    use crate::datapath::{GatewayCx, GatewayService, Handled, Network, Port};
    // By their full paths: layers.rs reads `super::` as another layer.
    use crate::metrics::{esc, render};

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    struct Dropping;
    impl GatewayService for Dropping {
        fn handle(&self, _: &GatewayCx, _: &Port, _: &[u8], _: &mut Vec<u8>) -> Handled {
            Handled::NotMine
        }
        fn drops(&self) -> Vec<(&'static str, u64)> {
            vec![("nd_bad_hop_limit", 3)]
        }
    }

    #[test]
    fn the_gateway_services_drops_are_exported() {
        let mut n = Network::new("lab", Mode::Nat, 1500);
        n.services.push(Arc::new(Dropping));
        let text = render(&[Arc::new(n)], &[]);
        assert!(text.contains("vunet_gateway_drops_total{network=\"lab\",reason=\"nd_bad_hop_limit\"} 3\n"), "{text}");
    }
}
