//! HTTP workloads across real processes: `flotilla apply` to the control plane, two node agents
//! serving the replicas in their ingresses, the endpoints the control plane shows, and an agent
//! without a replica passing requests on to one with it.

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Agent, ControlPlane, SETTLE_TIMEOUT, block_on, flotilla, http_get, ready, wait_for};

use crate::support;

#[test]
fn http_workloads_serve_through_every_agent_and_show_their_endpoints() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let node_a = Agent::start(&url, "node-a");
    let node_b = Agent::start(&url, "node-b");
    for agent in [&node_a, &node_b] {
        agent.process.wait_line("connected to the control plane");
    }

    // The echo example with two replicas: one per node, by the spread score.
    let guest = support::example("guests/http/echo.wasm");
    let manifest = data.path().join("echo.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: echo\n\
             spec:\n  module:\n    path: {guest}\n  replicas: 2\n  http:\n    pathPrefix: /echo\n"
        ),
    )
    .expect("write manifest");
    let out = flotilla(&[
        "--server",
        &url,
        "apply",
        "--wait",
        "-f",
        manifest.to_str().expect("utf-8"),
    ]);
    assert!(out.contains("echo: 2/2 ready"), "{out}");

    let object = wait_for(&url, "echo", "two endpoints", |o| {
        o["status"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 2)
    });
    let mut endpoints: Vec<String> = object["status"]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| e.as_str().expect("string").to_string())
        .collect();
    endpoints.sort();
    let mut expected = vec![
        format!("http://{}/echo", node_a.ingress),
        format!("http://{}/echo", node_b.ingress),
    ];
    expected.sort();
    assert_eq!(endpoints, expected);

    let wide = flotilla(&["--server", &url, "get", "workloads", "-o", "wide"]);
    assert!(wide.contains("ENDPOINTS"), "{wide}");
    for endpoint in &expected {
        assert!(wide.contains(endpoint.as_str()), "{wide}");
    }
    let nodes = flotilla(&["--server", &url, "get", "nodes", "-o", "wide"]);
    assert!(
        nodes.contains(&format!("http://{}", node_a.ingress)),
        "{nodes}"
    );

    // Every endpoint answers from a fresh sandbox.
    for agent in [&node_a, &node_b] {
        let response = http_get(agent.ingress, "/echo/info");
        assert_eq!(response.status, 200, "{}", response.text());
        let json: Value = serde_json::from_slice(&response.body).expect("JSON");
        assert_eq!(json["requests"], 1);
        assert_eq!(json["path"], "/echo/info");
    }

    // Scaled to one replica, one node serves the route; the other passes requests on to it,
    // as a Service over every agent needs.
    flotilla(&["--server", &url, "scale", "echo", "--replicas", "1"]);
    let object = wait_for(&url, "echo", "one endpoint", |o| {
        ready(o) == 1
            && o["status"]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 1)
    });
    let serving = object["status"]["endpoints"][0]
        .as_str()
        .expect("endpoint")
        .to_string();
    let (host, other) = if serving.contains(&node_a.ingress.to_string()) {
        (&node_a, &node_b)
    } else {
        (&node_b, &node_a)
    };
    let other_name = if std::ptr::eq(other, &node_a) {
        "node-a"
    } else {
        "node-b"
    };
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let direct = http_get(host.ingress, "/echo/count");
        let passed_on = http_get(other.ingress, "/echo/count");
        let via = passed_on.headers.get("via").and_then(|v| v.to_str().ok());
        if direct.status == 200
            && passed_on.status == 200
            && via == Some(&format!("1.1 {other_name}"))
        {
            assert_eq!(
                passed_on.text(),
                "1\n",
                "a fresh sandbox on the serving node"
            );
            assert!(direct.headers.get("via").is_none(), "served locally");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "direct {} {:?}, passed on {} {:?} via {via:?}",
            direct.status,
            direct.text(),
            passed_on.status,
            passed_on.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A streamed body goes through the hop too.
    let body: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let echoed = block_on(flotilla_tests::http::request(
        other.ingress,
        "POST",
        "anything",
        "/echo/echo",
        body.clone(),
    ))
    .expect("echo through the hop");
    assert_eq!(echoed.status, 200);
    assert!(echoed.body == body, "1 MiB echoed intact through the hop");

    // Deleted, the route goes everywhere: no node serves it and none passes it on.
    flotilla(&["--server", &url, "delete", "workload", "echo"]);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let statuses: Vec<u16> = [&node_a, &node_b]
            .iter()
            .map(|agent| http_get(agent.ingress, "/echo/count").status)
            .collect();
        if statuses == [404, 404] {
            break;
        }
        assert!(Instant::now() < deadline, "statuses {statuses:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_host_belongs_to_the_namespace_that_claimed_it_first() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let url = control_plane.url();
    let agent = Agent::start(&url, "node-1");
    agent.process.wait_line("connected to the control plane");
    let hello = support::example("guests/http/hello.wasm");
    let echo = support::example("guests/http/echo.wasm");
    let apply = |name: &str, yaml: String| {
        support::apply(
            &url,
            &data.path().join(format!("{name}.yaml")),
            &yaml,
            false,
        )
    };
    let manifest = |namespace: &str, name: &str, module: &str, prefix: &str| {
        format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\n\
             metadata:\n  name: {name}\n  namespace: {namespace}\n\
             spec:\n  module:\n    path: {module}\n  http:\n    host: shop.example.com\n\
             \x20   pathPrefix: {prefix}\n"
        )
    };
    apply("shop", manifest("team-a", "shop", &hello, "/"));
    wait_for(&url, "team-a/shop", "ready", |o| ready(o) == 1);
    // Another tenant claims the same host with a longer prefix, which would win its requests.
    apply("thief", manifest("team-b", "thief", &echo, "/api"));
    let thief = wait_for(&url, "team-b/thief", "a HostConflict", |o| {
        o["status"]["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["reason"] == "HostConflict"))
    });
    assert_eq!(thief["status"]["replicas"], 0, "{thief}");
    let conflict = thief["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["reason"] == "HostConflict"))
        .expect("condition");
    assert!(
        conflict["message"]
            .as_str()
            .is_some_and(|m| m.contains("belongs to namespace team-a (workload shop)")),
        "{conflict}"
    );
    let events = flotilla(&[
        "--server", &url, "describe", "workload", "thief", "-n", "team-b",
    ]);
    assert!(events.contains("HostConflict"), "{events}");
    // The owner's requests stay the owner's.
    let get = |path: &str| {
        block_on(flotilla_tests::http::request(
            agent.ingress,
            "GET",
            "shop.example.com",
            path,
            Vec::new(),
        ))
        .expect("response")
    };
    let answer = get("/api/orders");
    assert_eq!(
        (answer.status, answer.text()),
        (200, "Hello from Flotilla\n".into())
    );

    // Once the owner is gone, the host passes to the next claim.
    flotilla(&[
        "--server", &url, "delete", "workload", "shop", "-n", "team-a",
    ]);
    wait_for(&url, "team-b/thief", "ready", |o| ready(o) == 1);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let answer = get("/api/orders");
        if answer.status == 200 && answer.text().contains("\"path\":\"/api/orders\"") {
            break;
        }
        assert!(Instant::now() < deadline, "{}", answer.text());
        std::thread::sleep(Duration::from_millis(50));
    }
}
