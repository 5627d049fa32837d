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

/// Kubernetes mode (`--kubernetes-auth`): users present their own Kubernetes tokens, the
/// control plane checks them with TokenReview and every call with SubjectAccessReview, so the
/// cluster's RBAC (here the fake API server's rules) decides.
#[test]
fn kubernetes_users_do_what_the_cluster_rbac_allows_and_nothing_else() {
    use flotilla_tests::apiserver::{FakeApiServer, Method};

    const KUBE_ALICE: &str = "kube-alice-token";
    const KUBE_BOB: &str = "kube-bob-token";
    const WORKLOADS: &str = "flotilla.dev/wasmworkloads";
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let api = runtime.block_on(FakeApiServer::start());
    let api = api
        .with_status_subresource("wasmworkloads")
        .with_status_subresource("wasmnodes")
        .with_user(KUBE_ALICE, "alice", &["developers"])
        .with_user(KUBE_BOB, "bob", &["viewers"])
        // Alice edits team-a (as the `edit` ClusterRole bound in team-a would let her).
        .with_rule(
            "alice",
            &["get", "list", "watch", "create", "update", "delete"],
            &[WORKLOADS],
            "team-a",
        )
        .with_rule(
            "alice",
            &["get"],
            &["flotilla.dev/wasmworkloads/log"],
            "team-a",
        )
        .with_rule("developers", &["create"], &["flotilla.dev/modules"], "*")
        // Viewers read workloads everywhere.
        .with_rule("viewers", &["get", "list", "watch"], &[WORKLOADS], "*");
    let dir = tempfile::tempdir().expect("temp dir");
    // The control plane's own kubeconfig (its ServiceAccount, in a cluster) ...
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig("default")).expect("write kubeconfig");
    // ... and alice's, whose user has her token.
    let alice_kubeconfig = dir.path().join("alice-kubeconfig");
    std::fs::write(
        &alice_kubeconfig,
        api.kubeconfig("team-a")
            .replace("user: {}", &format!("user: {{token: {KUBE_ALICE}}}")),
    )
    .expect("write kubeconfig");
    let data_dir = dir.path().join("cp");
    let control_plane = ControlPlane::start_with(&data_dir, "127.0.0.1:0", |c| {
        c.args(["--store", "kubernetes", "--kubernetes-auth"])
            .env("KUBECONFIG", &kubeconfig)
            .env("FLOTILLA_DATA_DIR", &data_dir);
    });
    let url = control_plane.url();
    let _agent = Agent::start_connected(&url, "node-1");
    let as_alice = |args: &[&str]| {
        let output = Command::new(workspace_binary("flotilla"))
            .args(["--server", url.as_str(), "--token-from-kubeconfig"])
            .args(args)
            .env("KUBECONFIG", &alice_kubeconfig)
            .output()
            .expect("flotilla runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let as_bob = |args: &[&str]| {
        let mut all = vec!["--server", url.as_str(), "--token", KUBE_BOB];
        all.extend(args);
        try_flotilla(&all)
    };
    let reviews = |verb: &str, namespace: &str| {
        api.requests()
            .iter()
            .filter(|r| r.path.ends_with("/subjectaccessreviews"))
            .filter(|r| {
                let attributes = &r.body["spec"]["resourceAttributes"];
                r.body["spec"]["user"] == "alice"
                    && attributes["verb"] == verb
                    && attributes["resource"] == "wasmworkloads"
                    && attributes["namespace"] == namespace
            })
            .count()
    };

    // Alice applies in team-a with her kubeconfig's token: the control plane asked the
    // cluster whether alice may create wasmworkloads there, then wrote the object.
    let team_a = dir.path().join("team-a.yaml");
    std::fs::write(&team_a, manifest("team-a")).expect("write");
    let team_a = team_a.to_str().expect("utf-8");
    let (ok, _, stderr) = as_alice(&["apply", "-f", team_a, "--wait"]);
    assert!(ok, "{stderr}");
    assert_eq!(reviews("create", "team-a"), 1);
    let path = "/apis/flotilla.dev/v1alpha1/namespaces/team-a/wasmworkloads/hello";
    assert!(api.object(path).is_some(), "the object is in the cluster");
    let audit = control_plane.process.wait_line("verb=apply");
    assert!(
        audit.contains("allowed") && audit.contains("user=alice"),
        "{audit}"
    );
    let (ok, logs, stderr) = as_alice(&["logs", "hello", "-n", "team-a"]);
    assert!(ok, "{stderr}");
    assert_eq!(logs, "hello from flotilla\n");
    // Applying again updates: that is the verb checked.
    let (ok, _, stderr) = as_alice(&["apply", "-f", team_a]);
    assert!(ok, "{stderr}");
    assert_eq!(reviews("update", "team-a"), 1);

    // In team-b the cluster's RBAC does not let her: refused in one plain line, nothing
    // written.
    let team_b = dir.path().join("team-b.yaml");
    std::fs::write(&team_b, manifest("team-b")).expect("write");
    let (ok, _, stderr) = as_alice(&["apply", "-f", team_b.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(
        stderr.contains("user \"alice\" may not apply workloads in namespace \"team-b\""),
        "{stderr}"
    );
    assert!(
        api.object("/apis/flotilla.dev/v1alpha1/namespaces/team-b/wasmworkloads/hello")
            .is_none()
    );

    // Bob, a viewer, reads everywhere and changes nothing.
    let (ok, listed, stderr) = as_bob(&["get", "workloads", "-n", "team-a"]);
    assert!(ok, "{stderr}");
    assert!(listed.contains("hello"), "{listed}");
    let (ok, _, stderr) = as_bob(&["delete", "workload", "hello", "-n", "team-a"]);
    assert!(
        !ok && stderr.contains("user \"bob\" may not delete workloads in namespace \"team-a\""),
        "{stderr}"
    );
    let (ok, _, stderr) = as_bob(&["logs", "hello", "-n", "team-a"]);
    assert!(
        !ok && stderr.contains("may not get workloads/log"),
        "{stderr}"
    );

    // Without a token, or with one the cluster does not know: refused, saying how.
    let (ok, _, stderr) = try_flotilla(&["--server", &url, "get", "workloads", "-n", "team-a"]);
    assert!(
        !ok && stderr.contains("--token-from-kubeconfig"),
        "{stderr}"
    );
    let (ok, _, stderr) =
        try_flotilla(&["--server", &url, "--token", "made-up", "get", "workloads"]);
    assert!(
        !ok && stderr.contains("the Kubernetes API did not accept the token"),
        "{stderr}"
    );

    // When the cluster refuses the control plane's own write (its RBAC not installed), the
    // user gets the API server's reason as one line, not a debug dump of its Status.
    api.fail_next(Some(Method::POST), "/wasmworkloads", 403, 1);
    let second = dir.path().join("second.yaml");
    std::fs::write(
        &second,
        manifest("team-a").replace("name: hello", "name: second"),
    )
    .expect("write");
    let (ok, _, stderr) = as_alice(&["apply", "-f", second.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(
        stderr.contains("the control plane's own Kubernetes credentials were refused")
            && stderr.contains("injected failure")
            && !stderr.contains("Status {")
            && stderr.lines().filter(|l| !l.trim().is_empty()).count() == 1,
        "{stderr}"
    );

    // What alice applied is hers to delete.
    let (ok, _, stderr) = as_alice(&["delete", "workload", "hello", "-n", "team-a"]);
    assert!(ok, "{stderr}");
    // Her token was reviewed once per ten seconds, not once per call (she made six calls,
    // each a process of its own, with several requests each).
    let token_reviews = api
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/tokenreviews") && r.body["spec"]["token"] == KUBE_ALICE)
        .count();
    assert!(
        (1..6).contains(&token_reviews),
        "{token_reviews} TokenReviews"
    );
}
