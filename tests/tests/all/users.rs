//! Who may use the user API: a control plane with a token file and a policy, driven by the CLI
//! as different users; an open one refused beyond loopback.

use std::process::Command;

use crate::support::{self, Agent, ControlPlane, try_flotilla};
use flotilla_tests::{Process, workspace_binary};

const ALICE: &str = "alice-token-0123456789abcdef";
const BOB: &str = "bob-token-0123456789abcdef00";

const POLICY: &str = "
rules:
  - users: [alice]
    verbs: [get, list, watch, apply, delete]
    resources: [workloads, workloads/log, events]
    namespaces: [team-a]
  - users: [alice]
    verbs: [create]
    resources: [modules]
    namespaces: [\"*\"]
  - groups: [readers]
    verbs: [get, list]
    resources: [workloads, nodes]
    namespaces: [\"*\"]
";

fn manifest(namespace: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: hello\n  \
         namespace: {namespace}\nspec:\n  module:\n    path: {}\n  restartPolicy: Never\n",
        support::example("guests/hello.wasm")
    )
}

#[test]
fn users_do_what_the_policy_allows_and_nothing_else() {
    let data = tempfile::tempdir().expect("temp dir");
    let tokens = data.path().join("tokens.csv");
    std::fs::write(
        &tokens,
        format!("{ALICE},alice,1\n{BOB},bob,2,\"readers\"\n"),
    )
    .expect("write tokens");
    let policy = data.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).expect("write policy");
    let control_plane = ControlPlane::start_with(&data.path().join("cp"), "127.0.0.1:0", |c| {
        c.arg("--token-auth-file")
            .arg(&tokens)
            .arg("--authorization-policy-file")
            .arg(&policy);
    });
    let url = control_plane.url();
    // Agents join as before: their API has its own credentials.
    let _agent = Agent::start_connected(&url, "node-1");
    let as_user = |token: &str, args: &[&str]| {
        let mut all = vec!["--server", url.as_str(), "--token", token];
        all.extend(args);
        try_flotilla(&all)
    };

    // Alice applies in team-a: allowed, audited with her name.
    let team_a = data.path().join("team-a.yaml");
    std::fs::write(&team_a, manifest("team-a")).expect("write");
    let team_a = team_a.to_str().expect("utf-8");
    let (ok, _, stderr) = as_user(ALICE, &["apply", "-f", team_a, "--wait"]);
    assert!(ok, "{stderr}");
    let audit = control_plane.process.wait_line("verb=apply");
    assert!(
        audit.contains("allowed") && audit.contains("user=alice") && audit.contains("team-a"),
        "{audit}"
    );
    let (ok, logs, stderr) = as_user(ALICE, &["logs", "hello", "-n", "team-a"]);
    assert!(ok, "{stderr}");
    assert_eq!(logs, "hello from flotilla\n");

    // In team-b she may not: one plain line with user, verb, resource and namespace.
    let team_b = data.path().join("team-b.yaml");
    std::fs::write(&team_b, manifest("team-b")).expect("write");
    let (ok, _, stderr) = as_user(ALICE, &["apply", "-f", team_b.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(
        stderr.contains("user \"alice\" may not apply workloads in namespace \"team-b\""),
        "{stderr}"
    );
    let denial = control_plane.process.wait_line("denied");
    assert!(
        denial.contains("alice") && denial.contains("team-b"),
        "{denial}"
    );
    // Nor list every namespace's, nor read nodes.
    let (ok, _, stderr) = as_user(ALICE, &["get", "workloads"]);
    assert!(
        !ok && stderr.contains("may not list workloads in every namespace"),
        "{stderr}"
    );
    let (ok, _, stderr) = as_user(ALICE, &["get", "nodes"]);
    assert!(
        !ok && stderr.contains("may not list nodes (cluster-wide)"),
        "{stderr}"
    );

    // Bob, a reader, reads everywhere and changes nothing.
    let (ok, listed, stderr) = as_user(BOB, &["get", "workloads", "-n", "team-a"]);
    assert!(ok, "{stderr}");
    assert!(listed.contains("hello"), "{listed}");
    let (ok, _, stderr) = as_user(BOB, &["get", "nodes"]);
    assert!(ok, "{stderr}");
    let (ok, _, stderr) = as_user(BOB, &["delete", "workload", "hello", "-n", "team-a"]);
    assert!(
        !ok && stderr.contains("user \"bob\" may not delete workloads"),
        "{stderr}"
    );
    let (ok, _, stderr) = as_user(BOB, &["logs", "hello", "-n", "team-a"]);
    assert!(
        !ok && stderr.contains("may not get workloads/log"),
        "{stderr}"
    );

    // Without a token, or with a wrong one: refused before anything else.
    let (ok, _, stderr) = try_flotilla(&["--server", &url, "get", "workloads", "-n", "team-a"]);
    assert!(
        !ok && stderr.contains("requires authentication"),
        "{stderr}"
    );
    let (ok, _, stderr) = as_user("not-a-token-0123456789", &["get", "workloads"]);
    assert!(!ok && stderr.contains("the token is not valid"), "{stderr}");

    // What alice applied is still there and hers to delete.
    let (ok, _, stderr) = as_user(ALICE, &["delete", "workload", "hello", "-n", "team-a"]);
    assert!(ok, "{stderr}");
}

#[test]
fn an_open_user_api_is_refused_beyond_loopback() {
    let data = tempfile::tempdir().expect("temp dir");
    let mut refused = ControlPlane::spawn(data.path(), "0.0.0.0:0", |_| {});
    refused.wait_line("--insecure-allow-anonymous");
    assert!(!refused.wait().success());

    // Told so, it serves, and says the API is open.
    let open = ControlPlane::start_with(data.path(), "0.0.0.0:0", |c| {
        c.arg("--insecure-allow-anonymous");
    });
    drop(open);

    // A bad token file stops it with the line at fault.
    let tokens = data.path().join("tokens.csv");
    std::fs::write(&tokens, "short,alice,1\n").expect("write");
    let mut command = Command::new(workspace_binary("flotilla-control-plane"));
    command
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data.path())
        .arg("--token-auth-file")
        .arg(&tokens);
    let mut bad = Process::spawn(command, "control-plane");
    bad.wait_line("tokens.csv:1: tokens are at least 16 printable characters");
    assert!(!bad.wait().success());
}
