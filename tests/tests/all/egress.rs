//! Egress as a hostile tenant would try it, across real processes: HTTP workloads whose guest
//! (the echo example's `fetch`) sends outgoing requests through `wasi:http`, to an upstream on
//! loopback that counts the connections it gets.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use support::{Agent, ControlPlane, http_get};

use crate::support;

/// An HTTP server on loopback that answers every request with "upstream says hi" and counts
/// the connections it accepted.
struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl Upstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let body = "upstream says hi";
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { addr, connections }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

#[test]
fn sandboxes_reach_only_what_their_rules_list_and_never_the_agents_denied_ranges() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    // This agent denies link-local and IPv6 loopback only, so that the upstream on 127.0.0.1
    // stands for a private address, reachable only through a cidr rule.
    let agent = Agent::start_with(&url, "node-1", |c| {
        c.args(["--egress-deny", "169.254.0.0/16,::1/128"]);
    });
    agent.process.wait_line("connected to the control plane");
    let upstream = Upstream::start();
    let other = Upstream::start();
    let port = upstream.addr.port();

    let guest = support::example("guests/http/echo.wasm");
    let out = support::apply(
        &url,
        &data.path().join("egress.yaml"),
        &format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: closed\n\
             spec:\n  module:\n    path: {guest}\n  http:\n    pathPrefix: /closed\n\
             ---\n\
             apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: open\n\
             spec:\n  module:\n    path: {guest}\n  http:\n    pathPrefix: /open\n\
             \x20 network:\n    egress:\n\
             \x20   - cidr: 127.0.0.1/32\n      ports: [{port}]\n\
             \x20   - cidr: 169.254.169.254/32\n\
             \x20   - host: localhost\n"
        ),
        true,
    );
    assert!(out.contains("closed: 1/1 ready"), "{out}");
    assert!(out.contains("open: 1/1 ready"), "{out}");

    let fetch = |workload: &str, target: &str| {
        let response = http_get(agent.ingress, &format!("/{workload}/fetch?{target}"));
        (response.status, response.text())
    };
    let hi = format!("http://127.0.0.1:{port}/hi");

    // No rules: nothing goes out (http-request-denied, case 15), not even a connection.
    assert_eq!(fetch("closed", &hi), (502, "error 15\n".into()));
    assert_eq!(upstream.connections(), 0);

    // The listed address and port: the request goes through.
    assert_eq!(fetch("open", &hi), (200, "upstream says hi".into()));
    assert_eq!(upstream.connections(), 1);

    // The same address on a port no rule lists.
    let unlisted = format!("http://127.0.0.1:{}/hi", other.addr.port());
    assert_eq!(fetch("open", &unlisted), (502, "error 15\n".into()));

    // The cloud metadata address is in the agent's denied ranges: listing it gains nothing
    // (destination-ip-prohibited, case 4), written as IPv4 or as IPv4-mapped IPv6.
    for metadata in [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
    ] {
        assert_eq!(
            fetch("open", metadata),
            (502, "error 4\n".into()),
            "{metadata}"
        );
    }

    // A host rule admits a name only where it resolves to a public address: `localhost`
    // resolves to loopback, which only the cidr rule (on its one port) admits.
    let by_name = format!("http://localhost:{}/hi", other.addr.port());
    assert_eq!(fetch("open", &by_name), (502, "error 4\n".into()));
    assert_eq!(other.connections(), 0, "no refused request connected");

    // Nothing else was disturbed: both workloads still serve.
    for workload in ["closed", "open"] {
        let response = http_get(agent.ingress, &format!("/{workload}/info"));
        assert_eq!(response.status, 200, "{}", response.text());
    }
    assert_eq!(upstream.connections(), 1);

    // Each refusal is a line in the workload's log, where its owner looks.
    let logs = support::flotilla(&["--server", &url, "logs", "open"]);
    assert!(
        logs.contains("flotilla: egress refused: 169.254.169.254:80 is in the agent's denied range 169.254.0.0/16"),
        "{logs}"
    );
    let logs = support::flotilla(&["--server", &url, "logs", "closed"]);
    assert!(
        logs.contains(&format!(
            "egress refused: 127.0.0.1:{port}: spec.network.egress lists nothing"
        )),
        "{logs}"
    );
}

#[test]
fn invalid_egress_rules_are_refused_at_apply() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let guest = support::example("guests/http/echo.wasm");
    let (ok, stdout, stderr) = support::try_apply(
        &url,
        &data.path().join("bad.yaml"),
        &format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: bad\n\
             spec:\n  module:\n    path: {guest}\n  http:\n    pathPrefix: /bad\n\
             \x20 network:\n    egress:\n\
             \x20   - host: 169.254.169.254\n\
             \x20   - cidr: 10.1.2.3/8\n"
        ),
        false,
    );
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("spec.network.egress[0].host"), "{stderr}");
    assert!(stderr.contains("did you mean 10.0.0.0/8"), "{stderr}");
}
