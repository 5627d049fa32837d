//! The agent's admin API as an attacker on the node would try it: without the agent's token
//! nothing is answered; with it, the CLI works as before.

use support::{Agent, ControlPlane, try_flotilla};

use crate::support;

#[test]
fn an_admin_api_with_a_token_answers_only_those_who_present_it() {
    let data = tempfile::tempdir().expect("temp dir");
    let control_plane = ControlPlane::start(data.path(), "127.0.0.1:0");
    let token = data.path().join("admin-token");
    std::fs::write(&token, "n0de-admin\n").expect("write token");
    let agent = Agent::start_with(&control_plane.url(), "node-1", |c| {
        c.arg("--admin-token-file").arg(&token);
    });
    let admin = format!("http://{}", agent.admin);

    let (ok, _, stderr) = try_flotilla(&["--agent", &admin, "get", "sandboxes"]);
    assert!(!ok);
    assert!(stderr.contains("requires a token"), "{stderr}");

    let wrong = data.path().join("wrong-token");
    std::fs::write(&wrong, "guess").expect("write token");
    let (ok, _, stderr) = try_flotilla(&[
        "--agent",
        &admin,
        "--agent-token-file",
        wrong.to_str().expect("utf-8"),
        "capacity",
    ]);
    assert!(!ok);
    assert!(stderr.contains("invalid admin token"), "{stderr}");

    let (ok, stdout, stderr) = try_flotilla(&[
        "--agent",
        &admin,
        "--agent-token-file",
        token.to_str().expect("utf-8"),
        "get",
        "sandboxes",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("SANDBOX"), "{stdout}");
}
