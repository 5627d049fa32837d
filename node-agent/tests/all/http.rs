//! HTTP workloads through a real agent's ingress: real sockets, the committed C guests, a fresh
//! sandbox per request.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use clap::Parser;
use flotilla_node_agent::agent::Agent;
use flotilla_node_agent::config::{Args, Config};
use flotilla_proto::agent::v1::{HttpRoute, Resources, RestartPolicy, SandboxPhase, WorkloadSpec};
use flotilla_tests::http::{self, get, request};
use futures::future::join_all;
use http_body_util::BodyExt;

fn guest(name: &str) -> Vec<u8> {
    let path = flotilla_tests::guests::guests_dir().join(format!("http/{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn start_agent() -> Agent {
    start_agent_with(&[]).await
}

async fn start_agent_with(extra: &[&str]) -> Agent {
    let args = Args::try_parse_from(
        [
            "flotilla-node-agent",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--no-cache",
            "--max-sandboxes",
            "2000",
            "--max-memory-per-sandbox",
            "64Mi",
            "--default-memory-limit",
            "32Mi",
            "--shutdown-grace",
            "10s",
        ]
        .iter()
        .chain(extra),
    )
    .expect("flags parse");
    Agent::start(Config::try_from(args).expect("valid config"))
        .await
        .expect("agent starts")
}

fn http_spec(name: &str, module: Vec<u8>, route: HttpRoute) -> WorkloadSpec {
    WorkloadSpec {
        http: Some(route),
        restart_policy: RestartPolicy::Always as i32,
        ..spec(name, module)
    }
}

fn prefix(path_prefix: &str) -> HttpRoute {
    HttpRoute {
        path_prefix: path_prefix.into(),
        ..HttpRoute::default()
    }
}

/// Applies `spec` and waits until its replicas serve.
async fn serve(agent: &Agent, spec: WorkloadSpec) {
    let name = spec.name.clone();
    agent.supervisor().apply(spec).await.expect("applies");
    wait_for(
        agent.supervisor(),
        &name,
        "replicas serving",
        all_in(SandboxPhase::Running),
    )
    .await;
}

fn ingress(agent: &Agent) -> SocketAddr {
    agent.ingress_addr().expect("ingress enabled")
}

async fn metrics(agent: &Agent) -> String {
    http::get(agent.metrics_addr(), "/metrics")
        .await
        .expect("metrics")
        .text()
}

/// The value of the metric line starting with `prefix`, or 0 when absent.
fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Waits (bounded) until `count` per-request sandboxes of `workload` are alive, failing if
/// `requests`, the task that sent them, ends first.
async fn wait_for_instances<T>(
    agent: &Agent,
    workload: &str,
    count: u32,
    requests: &tokio::task::JoinHandle<T>,
) {
    let gauge = format!("flotilla_http_instances{{workload=\"{workload}\"}}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metric(&metrics(agent).await, &gauge) < f64::from(count) {
        assert!(
            !requests.is_finished(),
            "the requests ended before they were seen"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the requests never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `count` requests for `path_of(i)` one after another over one kept-alive connection
/// and returns each answer's status and body.
async fn sequential(
    addr: SocketAddr,
    count: usize,
    path_of: impl Fn(usize) -> String,
) -> Vec<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);
    let mut answers = Vec::new();
    for i in 0..count {
        let request = hyper::Request::get(path_of(i))
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        sender.ready().await.expect("the connection stays open");
        let response = sender.send_request(request).await.expect("answered");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        answers.push((status, String::from_utf8_lossy(&body).into_owned()));
    }
    answers
}

/// With `maxConcurrency: 1`, a client sending one request after another over a kept-alive
/// connection is never turned away: the slot is free once it has read the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_at_a_time_over_one_connection_is_never_turned_away() {
    let agent = start_agent().await;
    for name in ["hello", "echo"] {
        let route = HttpRoute {
            max_concurrency: 1,
            ..prefix(&format!("/{name}"))
        };
        serve(&agent, http_spec(name, guest(name), route)).await;
    }
    let addr = ingress(&agent);
    for name in ["hello", "echo"] {
        let answers = sequential(addr, 200, |_| format!("/{name}/count")).await;
        for (i, (status, body)) in answers.iter().enumerate() {
            assert_eq!(*status, 200, "{name}: request {i}: {body}");
        }
    }
    agent.shutdown().await;
}

/// A WASI 0.3 `wasi:http/handler` (`examples/guests/p3-http/`, Rust) serves once the workload
/// enables `component-model-async` on a node that offers it: `handle` returns the response and
/// a guest task writes its body after; a trap fails only its own request. Without the
/// feature, the workload is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_0_3_handler_serves_requests_with_component_model_async() {
    let agent = start_agent_with(&[
        "--wasm-features",
        "gc,exceptions,wide-arithmetic,custom-page-sizes,component-model-async",
    ])
    .await;
    let path = flotilla_tests::guests::guests_dir().join("p3-http.wasm");
    let module = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    let refused = agent
        .supervisor()
        .apply(http_spec("p3-refused", module.clone(), prefix("/refused")))
        .await;
    let Err(flotilla_node_agent::supervisor::ApplyError::Prepare { source, .. }) = refused else {
        panic!("refused without the feature: {refused:?}");
    };
    let message = source.to_string();
    assert!(
        message.contains("add `component-model-async` to spec.wasm.features"),
        "{message}"
    );

    // One request at a time: a client that sends its next request as soon as it has read an
    // answer must find the slot free, though the sandbox ends just after the body is sent.
    let mut spec = http_spec(
        "p3",
        module,
        HttpRoute {
            max_concurrency: 1,
            ..prefix("/p3")
        },
    );
    spec.wasm_features = vec!["component-model-async".into()];
    serve(&agent, spec).await;
    let addr = ingress(&agent);
    let answer = get(addr, "/p3/hello?x=1").await.expect("p3");
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, "hello from WASI 0.3: /p3/hello?x=1\n")
    );
    assert_eq!(answer.headers["content-type"], "text/plain");
    let answers = sequential(addr, 200, |i| format!("/p3/{i}")).await;
    for (i, answer) in answers.into_iter().enumerate() {
        assert_eq!(
            answer,
            (200, format!("hello from WASI 0.3: /p3/{i}\n")),
            "request {i} on one kept-alive connection"
        );
    }
    // A trap ends that request's sandbox with the reason, and nothing else.
    let trapped = get(addr, "/p3/trap").await.expect("trap");
    assert_eq!(trapped.status, 500);
    assert!(
        trapped.text().starts_with("the handler failed: Trap:"),
        "{}",
        trapped.text()
    );
    let after = get(addr, "/p3/after").await.expect("after");
    assert_eq!(after.text(), "hello from WASI 0.3: /p3/after\n");

    let text = metrics(&agent).await;
    assert!(
        metric(
            &text,
            "flotilla_http_requests_total{workload=\"p3\",code=\"200\"}"
        ) >= 202.0,
        "{text}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_gets_a_fresh_sandbox() {
    let agent = start_agent().await;
    serve(&agent, http_spec("hello", guest("hello"), prefix("/hello"))).await;
    serve(&agent, http_spec("echo", guest("echo"), prefix("/echo"))).await;
    let addr = ingress(&agent);

    let hello = get(addr, "/hello").await.expect("hello");
    assert_eq!(hello.status, 200);
    assert_eq!(hello.text(), "Hello from Flotilla\n");
    assert_eq!(
        hello.headers["content-type"], "text/plain; charset=utf-8",
        "guest headers pass through"
    );

    // A counter in guest memory: a reused instance would count past 1.
    for _ in 0..20 {
        assert_eq!(get(addr, "/echo/count").await.expect("count").text(), "1\n");
    }
    let concurrent = join_all((0..64).map(|_| get(addr, "/echo/count"))).await;
    for response in concurrent {
        let response = response.expect("count");
        assert_eq!((response.status, response.text().as_str()), (200, "1\n"));
    }

    let info = get(addr, "/echo/info?x=1").await.expect("info");
    assert_eq!(info.headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&info.body).expect("JSON");
    assert_eq!(json["method"], "GET");
    assert_eq!(json["path"], "/echo/info");
    assert_eq!(json["requests"], 1);

    let text = metrics(&agent).await;
    assert!(
        metric(
            &text,
            "flotilla_http_requests_total{workload=\"echo\",code=\"200\"}"
        ) >= 85.0,
        "{text}"
    );
    assert!(text.contains("flotilla_http_request_duration_seconds_count{workload=\"echo\"}"));
    assert_eq!(
        metric(&text, "flotilla_http_instances{workload=\"echo\"}"),
        0.0,
        "no sandbox outlives its request"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_fails_only_its_own_request() {
    let agent = start_agent().await;
    serve(&agent, http_spec("echo", guest("echo"), prefix("/"))).await;
    let addr = ingress(&agent);

    let requests = (0..40).map(|i| {
        let path = if i % 2 == 0 { "/trap" } else { "/info" };
        async move { (path, get(addr, path).await.expect("response")) }
    });
    for (path, response) in join_all(requests).await {
        if path == "/trap" {
            assert_eq!(response.status, 500, "{}", response.text());
            assert!(response.text().contains("Trap"), "{}", response.text());
        } else {
            assert_eq!(response.status, 200, "{}", response.text());
        }
    }
    // The replica itself is untouched: still running, never restarted.
    let statuses = agent.supervisor().list(Some("echo"));
    assert_eq!(statuses[0].phase, SandboxPhase::Running as i32);
    assert_eq!(statuses[0].restart_count, 0);
    let logs = logs(agent.supervisor(), "echo", 0);
    assert_eq!(logs.matches("request failed: Trap").count(), 20, "{logs}");
    let text = metrics(&agent).await;
    assert_eq!(
        metric(
            &text,
            "flotilla_http_request_failures_total{workload=\"echo\",reason=\"Trap\"}"
        ),
        20.0,
        "{text}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_request_is_cut_at_its_limits() {
    let agent = start_agent().await;
    // CPU time: 200 ms per request.
    let mut cpu = http_spec("cpu", guest("echo"), prefix("/cpu"));
    cpu.resources = Some(Resources {
        cpu_limit_ms: 200,
        ..Resources::default()
    });
    serve(&agent, cpu).await;
    // Wall-clock: 300 ms per request, and the guest sleeps (no CPU) for 5 s.
    let wall = http_spec(
        "wall",
        guest("echo"),
        HttpRoute {
            path_prefix: "/wall".into(),
            timeout_ms: 300,
            ..HttpRoute::default()
        },
    );
    serve(&agent, wall).await;
    let addr = ingress(&agent);

    let spin = get(addr, "/cpu/spin").await.expect("response");
    assert_eq!(spin.status, 500, "{}", spin.text());
    assert!(spin.text().contains("CpuLimit"), "{}", spin.text());
    let sleep = get(addr, "/wall/sleep?ms=5000").await.expect("response");
    assert_eq!(sleep.status, 504, "{}", sleep.text());
    assert!(sleep.text().contains("deadline"), "{}", sleep.text());
    // Both workloads still answer.
    assert_eq!(get(addr, "/cpu/count").await.expect("count").status, 200);
    assert_eq!(get(addr, "/wall/count").await.expect("count").status, 200);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_limit_answers_503() {
    let agent = start_agent().await;
    let limited = http_spec(
        "limited",
        guest("echo"),
        HttpRoute {
            max_concurrency: 2,
            ..HttpRoute::default()
        },
    );
    serve(&agent, limited).await;
    let addr = ingress(&agent);

    let slow = tokio::spawn(join_all((0..2).map(move |_| get(addr, "/sleep?ms=4000"))));
    // Wait (bounded) until both slow requests hold their sandboxes.
    wait_for_instances(&agent, "limited", 2, &slow).await;
    let refused = get(addr, "/info").await.expect("response");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.headers["retry-after"], "1");
    assert!(refused.text().contains("limit of 2"), "{}", refused.text());
    for response in slow.await.expect("slow requests") {
        let response = response.expect("slow response");
        assert_eq!(
            (response.status, response.text().as_str()),
            (200, "slept\n")
        );
    }
    assert_eq!(get(addr, "/info").await.expect("after").status, 200);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream() {
    let agent = start_agent().await;
    serve(&agent, http_spec("echo", guest("echo"), prefix("/"))).await;
    let addr = ingress(&agent);

    // The request body is a channel the test feeds one chunk at a time; each chunk must come
    // back before the next is sent, so neither side can be buffering the whole body.
    let (tx, rx) =
        futures::channel::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(1);
    let body = http_body_util::StreamBody::new(rx);
    let mut sender = http::connect(addr).await.expect("connect");
    let streamed = hyper::Request::post("/echo")
        .header("host", addr.to_string())
        .body(body)
        .expect("request");
    let mut tx = tx;
    let exchange = async move {
        use futures::SinkExt;
        tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(
            b"first chunk|",
        ))))
        .await
        .expect("send first");
        let response = sender.send_request(streamed).await.expect("response head");
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut echoed = Vec::new();
        let mut sent = b"first chunk|".len();
        for chunk in ["second chunk|", "third chunk|"] {
            // What was sent so far comes back before the next chunk is sent.
            while echoed.len() < sent {
                let frame = body.frame().await.expect("frame").expect("data");
                echoed.extend_from_slice(&frame.into_data().expect("data frame"));
            }
            tx.send(Ok(hyper::body::Frame::data(Bytes::from(chunk))))
                .await
                .expect("send chunk");
            sent += chunk.len();
        }
        drop(tx);
        while let Some(frame) = body.frame().await {
            echoed.extend_from_slice(&frame.expect("frame").into_data().expect("data frame"));
        }
        echoed
    };
    let echoed = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("echo in time");
    assert_eq!(echoed, b"first chunk|second chunk|third chunk|");

    // A large body, both ways.
    let big: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let response = request(addr, "POST", &addr.to_string(), "/echo", big.clone())
        .await
        .expect("big echo");
    assert_eq!(response.status, 200);
    assert!(response.body == big, "4 MiB echoed intact");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_prefix() {
    let agent = start_agent().await;
    let hello = http_spec(
        "hello",
        guest("hello"),
        HttpRoute {
            host: "hello.test".into(),
            ..HttpRoute::default()
        },
    );
    serve(&agent, hello).await;
    serve(&agent, http_spec("echo", guest("echo"), prefix("/api"))).await;
    let addr = ingress(&agent);

    let on = |host: &'static str, path: &'static str| async move {
        request(addr, "GET", host, path, Bytes::new())
            .await
            .expect("response")
    };
    assert_eq!(
        on("hello.test", "/anything").await.text(),
        "Hello from Flotilla\n"
    );
    assert_eq!(
        on("HELLO.test:8080", "/").await.text(),
        "Hello from Flotilla\n"
    );
    let api = on("other.test", "/api/info").await;
    assert_eq!(api.status, 200);
    assert!(
        api.text().contains("\"path\":\"/api/info\""),
        "{}",
        api.text()
    );
    assert_eq!(on("other.test", "/api").await.status, 200);
    // Whole segments only, and nothing for an unknown host outside /api.
    let missing = on("other.test", "/apix").await;
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("no workload"), "{}", missing.text());
    assert_eq!(on("other.test", "/").await.status, 404);

    // A second workload cannot take a route that is served.
    let mut taken = http_spec("thief", guest("hello"), prefix("/api"));
    taken.restart_policy = RestartPolicy::Never as i32;
    agent.supervisor().apply(taken).await.expect("applies");
    let statuses = wait_for(agent.supervisor(), "thief", "route conflict", |s| {
        s.first()
            .is_some_and(|s| s.phase == SandboxPhase::Failed as i32)
    })
    .await;
    assert_eq!(statuses[0].reason, "RouteConflict");
    assert!(
        statuses[0].message.contains("echo"),
        "{}",
        statuses[0].message
    );
    assert_eq!(on("other.test", "/api/count").await.text(), "1\n");

    // A removed workload's route goes with it.
    agent.supervisor().stop("echo", None).await;
    assert_eq!(on("other.test", "/api/info").await.status, 404);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    let agent = start_agent().await;
    serve(&agent, http_spec("echo", guest("echo"), prefix("/"))).await;
    let addr = ingress(&agent);
    // Long enough that a loaded machine still sees it in flight.
    let in_flight = tokio::spawn(get(addr, "/sleep?ms=4000"));
    wait_for_instances(&agent, "echo", 1, &in_flight).await;
    let shutdown = tokio::spawn(agent.shutdown());
    // New connections are refused once the ingress stops accepting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingress still accepting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = in_flight.await.expect("task").expect("in-flight response");
    assert_eq!(
        (response.status, response.text().as_str()),
        (200, "slept\n")
    );
    shutdown.await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_command_mismatches_are_clear_errors() {
    let agent = start_agent().await;
    let not_http = http_spec(
        "not-http",
        std::fs::read(flotilla_tests::guests::guests_dir().join("hello-c.wasm")).expect("hello-c"),
        prefix("/"),
    );
    let error = agent
        .supervisor()
        .apply(not_http)
        .await
        .expect_err("refused");
    assert!(
        error.to_string().contains("preparing") && format!("{error:?}").contains("NotHttpHandler"),
        "{error:?}"
    );
    let no_route = WorkloadSpec {
        http: None,
        ..http_spec("no-route", guest("hello"), prefix("/"))
    };
    let error = agent
        .supervisor()
        .apply(no_route)
        .await
        .expect_err("refused");
    assert!(
        format!("{error:?}").contains("HttpWithoutRoute"),
        "{error:?}"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_only_once_its_readiness_path_answers_2xx() {
    let agent = start_agent().await;
    let ready = http_spec(
        "ready",
        guest("echo"),
        HttpRoute {
            path_prefix: "/ready".into(),
            readiness_path: "/ready/info".into(),
            ..HttpRoute::default()
        },
    );
    serve(&agent, ready).await;
    let addr = ingress(&agent);
    assert_eq!(
        get(addr, "/ready/count").await.expect("count").text(),
        "1\n"
    );

    let mut failing = http_spec(
        "failing",
        guest("echo"),
        HttpRoute {
            path_prefix: "/failing".into(),
            readiness_path: "/failing/trap".into(),
            ..HttpRoute::default()
        },
    );
    failing.restart_policy = RestartPolicy::Never as i32;
    agent.supervisor().apply(failing).await.expect("applies");
    let statuses = wait_for(agent.supervisor(), "failing", "readiness failure", |s| {
        s.first()
            .is_some_and(|s| s.phase == SandboxPhase::Failed as i32)
    })
    .await;
    assert_eq!(statuses[0].reason, "ReadinessFailed");
    assert!(
        statuses[0]
            .message
            .contains("GET /failing/trap answered 500"),
        "{}",
        statuses[0].message
    );
    // It never took its route.
    assert_eq!(
        get(addr, "/failing/info").await.expect("response").status,
        404
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_is_served_too() {
    let agent = start_agent().await;
    serve(&agent, http_spec("echo", guest("echo"), prefix("/"))).await;
    let stream = tokio::net::TcpStream::connect(ingress(&agent))
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2c handshake");
    tokio::spawn(connection);
    // Many requests multiplexed on one connection, each in its own sandbox.
    let requests = (0..20).map(|_| {
        let request = hyper::Request::get("http://echo.test/count")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        sender.send_request(request)
    });
    for response in join_all(requests).await {
        let response = response.expect("response");
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"1\n");
    }
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_replica_is_admitted_as_a_sandbox_per_concurrent_request() {
    // 2,000 sandboxes (start_agent's --max-sandboxes).
    let agent = start_agent().await;
    let route = |path: &str, max_concurrency| HttpRoute {
        max_concurrency,
        ..prefix(path)
    };
    // Two replicas of 600 concurrent requests each hold 1,200 of the 2,000 sandboxes.
    serve(
        &agent,
        WorkloadSpec {
            replicas: 2,
            ..http_spec("wide", guest("hello"), route("/wide", 600))
        },
    )
    .await;
    let capacity = agent.supervisor().capacity();
    assert_eq!(capacity.sandboxes, 1200, "{capacity:?}");
    // A replica of 1,000 more does not fit in the 800 left, and changes nothing.
    let error = agent
        .supervisor()
        .apply(http_spec("greedy", guest("hello"), route("/greedy", 1000)))
        .await
        .expect_err("refused");
    let message = error.to_string();
    assert!(
        message.contains("needs 1000 sandboxes (1 replicas serving up to 1000 requests at once")
            && message.contains("only 800 of 2000 are free"),
        "{message}"
    );
    // Past the model's ceiling, whichever door it came through.
    let error = agent
        .supervisor()
        .apply(http_spec("huge", guest("hello"), route("/huge", 10_001)))
        .await
        .expect_err("refused");
    assert!(
        format!("{error:?}").contains("must be at most 10000"),
        "{error:?}"
    );
    // One of the default concurrency (80) fits, and the first still serves.
    serve(&agent, http_spec("small", guest("hello"), prefix("/small"))).await;
    assert_eq!(agent.supervisor().capacity().sandboxes, 1280);
    let wide = get(ingress(&agent), "/wide").await.expect("wide");
    assert_eq!(wide.status, 200);
    agent.shutdown().await;
}
