//! TLS between agents, the CLI and the control plane, with real processes: the control plane
//! serves with a certificate from a test CA and requires agents to present client certificates
//! from it (mutual TLS, as a cert-manager-issued Secret would provide).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::{Agent, ControlPlane, try_flotilla};

use crate::support;

struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    client: (PathBuf, PathBuf),
    /// A client certificate from a CA the control plane does not trust.
    stranger: (PathBuf, PathBuf),
    stranger_ca: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("CA");
    (params, key, cert.pem())
}

/// A certificate for `name` (its Common Name) with `sans`, signed by `issuer`.
fn leaf(dir: &Path, name: &str, sans: &[&str], issuer: &Issuer<'_, KeyPair>) -> (PathBuf, PathBuf) {
    leaf_in_orgs(dir, name, sans, &[], issuer)
}

/// [`leaf`], with Organizations (a user's groups).
fn leaf_in_orgs(
    dir: &Path,
    name: &str,
    sans: &[&str],
    orgs: &[&str],
    issuer: &Issuer<'_, KeyPair>,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(sans.iter().map(|s| (*s).to_string()).collect::<Vec<_>>())
            .expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    for org in orgs {
        params
            .distinguished_name
            .push(DnType::OrganizationName, *org);
    }
    let cert = params.signed_by(&key, issuer).expect("sign");
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    (cert_path, key_path)
}

fn pki(dir: &Path) -> Pki {
    let (ca_params, ca_key, ca_pem) = ca("flotilla test CA");
    let (other_params, other_key, other_pem) = ca("some other CA");
    let ca = dir.join("ca.crt");
    let stranger_ca = dir.join("other-ca.crt");
    std::fs::write(&ca, ca_pem).expect("write");
    std::fs::write(&stranger_ca, other_pem).expect("write");
    let issuer = Issuer::new(ca_params, ca_key);
    let other = Issuer::new(other_params, other_key);
    Pki {
        server: leaf(dir, "control-plane", &["localhost", "127.0.0.1"], &issuer),
        client: leaf(dir, "agent", &["node-tls"], &issuer),
        stranger: leaf(dir, "stranger", &["node-x"], &other),
        ca,
        stranger_ca,
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn agents_join_over_mutual_tls_and_nothing_else_gets_in() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(dir.path());
    let control_plane = ControlPlane::start_with(&dir.path().join("cp"), "127.0.0.1:0", |c| {
        c.args(["--tls-cert-file", &path(&pki.server.0)])
            .args(["--tls-key-file", &path(&pki.server.1)])
            .args(["--tls-client-ca-file", &path(&pki.ca)]);
    });
    let url = format!("https://127.0.0.1:{}", control_plane.addr.port());

    // An agent with the CA and a client certificate from it joins.
    let member = Agent::start_with(&url, "node-tls", |c| {
        c.args(["--tls-ca-file", &path(&pki.ca)])
            .args(["--tls-cert-file", &path(&pki.client.0)])
            .args(["--tls-key-file", &path(&pki.client.1)]);
    });
    member.process.wait_line("connected to the control plane");

    // Without a client certificate: the TLS session works, registration is refused.
    let anonymous = Agent::start_with(&url, "node-anonymous", |c| {
        c.args(["--tls-ca-file", &path(&pki.ca)]);
    });
    anonymous
        .process
        .wait_line("requires agents to present a client certificate");

    // A client certificate from another CA fails the handshake.
    let stranger = Agent::start_with(&url, "node-x", |c| {
        c.args(["--tls-ca-file", &path(&pki.ca)])
            .args(["--tls-cert-file", &path(&pki.stranger.0)])
            .args(["--tls-key-file", &path(&pki.stranger.1)]);
    });
    stranger.process.wait_line("UnknownCA");

    // An agent that does not trust the control plane's CA does not talk to it.
    let suspicious = Agent::start_with(&url, "node-y", |c| {
        c.args(["--tls-ca-file", &path(&pki.stranger_ca)])
            .args(["--tls-cert-file", &path(&pki.client.0)])
            .args(["--tls-key-file", &path(&pki.client.1)]);
    });
    suspicious.process.wait_line("invalid peer certificate");

    // The CLI needs only the CA: the user API does not ask for client certificates.
    let ca = path(&pki.ca);
    let (ok, stdout, stderr) =
        try_flotilla(&["--server", &url, "--tls-ca-file", &ca, "get", "nodes"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("node-tls"), "{stdout}");
    assert!(!stdout.contains("node-anonymous"), "{stdout}");
    assert!(!stdout.contains("node-x"), "{stdout}");
    let (ok, _, stderr) = try_flotilla(&["--server", &url, "get", "nodes"]);
    assert!(!ok, "the webpki roots do not know the test CA");
    assert!(
        stderr.contains("cannot reach the control plane"),
        "{stderr}"
    );
    // Plain HTTP/2 to a TLS port fails too.
    let plain = format!("http://127.0.0.1:{}", control_plane.addr.port());
    let (ok, _, _) = try_flotilla(&["--server", &plain, "get", "nodes"]);
    assert!(!ok, "plaintext reached a TLS control plane");
    control_plane.stop();
}

#[test]
fn users_are_known_by_certificates_from_the_users_ca_and_agents_certificates_are_no_users() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = pki(dir.path());
    let (users_params, users_key, users_pem) = ca("flotilla users CA");
    let users_ca = dir.path().join("users-ca.crt");
    std::fs::write(&users_ca, users_pem).expect("write");
    let users = Issuer::new(users_params, users_key);
    let (cert, key) = leaf_in_orgs(dir.path(), "alice", &[], &["team-a-devs"], &users);
    let alice = (path(&cert), path(&key));
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "rules:\n  - groups: [team-a-devs]\n    verbs: [\"*\"]\n    \
         resources: [workloads, workloads/log, modules]\n    namespaces: [team-a]\n",
    )
    .expect("write");
    let tls = |c: &mut std::process::Command| {
        c.args(["--tls-cert-file", &path(&pki.server.0)])
            .args(["--tls-key-file", &path(&pki.server.1)])
            .args(["--tls-client-ca-file", &path(&pki.ca)]);
    };

    // The agents' CA as the users' too is refused: every node holds a certificate from it.
    let mut same = ControlPlane::spawn(&dir.path().join("same"), "127.0.0.1:0", |c| {
        tls(c);
        c.args(["--user-client-ca-file", &path(&pki.ca)]);
    });
    same.wait_line("must not be the agents' CA");
    assert!(!same.wait().success());

    let control_plane = ControlPlane::start_with(&dir.path().join("cp"), "127.0.0.1:0", |c| {
        tls(c);
        c.args(["--user-client-ca-file", &path(&users_ca)])
            .args(["--authorization-policy-file", &path(&policy)]);
    });
    let url = format!("https://127.0.0.1:{}", control_plane.addr.port());
    let member = Agent::start_with(&url, "node-tls", |c| {
        c.args(["--tls-ca-file", &path(&pki.ca)])
            .args(["--tls-cert-file", &path(&pki.client.0)])
            .args(["--tls-key-file", &path(&pki.client.1)]);
    });
    member.process.wait_line("connected to the control plane");
    let ca = path(&pki.ca);
    let as_cert = |cert: &(String, String), args: &[&str]| {
        let mut all = vec![
            "--server",
            url.as_str(),
            "--tls-ca-file",
            ca.as_str(),
            "--client-certificate",
            cert.0.as_str(),
            "--client-key",
            cert.1.as_str(),
        ];
        all.extend(args);
        try_flotilla(&all)
    };

    // Alice, by her certificate, in her group's namespace: allowed, audited by name.
    let manifest = |namespace: &str| {
        let file = dir.path().join(format!("{namespace}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: flotilla.dev/v1alpha1\nkind: WasmWorkload\nmetadata:\n  name: hello\n  \
                 namespace: {namespace}\nspec:\n  module:\n    path: {}\n  restartPolicy: Never\n",
                support::example("guests/hello.wasm")
            ),
        )
        .expect("write");
        path(&file)
    };
    let (ok, _, stderr) = as_cert(&alice, &["apply", "-f", &manifest("team-a"), "--wait"]);
    assert!(ok, "{stderr}");
    let audit = control_plane.process.wait_line("verb=apply");
    assert!(audit.contains("user=alice"), "{audit}");
    let (ok, logs, stderr) = as_cert(&alice, &["logs", "hello", "-n", "team-a"]);
    assert!(ok, "{stderr}");
    assert_eq!(logs, "hello from flotilla\n");
    let (ok, _, stderr) = as_cert(&alice, &["apply", "-f", &manifest("team-b")]);
    assert!(!ok && stderr.contains("user \"alice\" may not"), "{stderr}");

    // An agent's certificate passes the handshake but is nobody on the user API.
    let agent = (path(&pki.client.0), path(&pki.client.1));
    let (ok, _, stderr) = as_cert(&agent, &["get", "workloads", "-n", "team-a"]);
    assert!(
        !ok && stderr.contains("requires authentication"),
        "{stderr}"
    );
    // Nor is a caller without a certificate; the error says what to give.
    let (ok, _, stderr) = try_flotilla(&[
        "--server",
        &url,
        "--tls-ca-file",
        &ca,
        "get",
        "workloads",
        "-n",
        "team-a",
    ]);
    assert!(!ok && stderr.contains("--client-certificate"), "{stderr}");
    control_plane.stop();
}
