//! `--token-from-kubeconfig`: the bearer token of the kubeconfig's current user, for a control
//! plane that checks users' Kubernetes credentials (`--kubernetes-auth`). It comes from the
//! user's `token`, `tokenFile` or exec credential plugin (as for EKS, GKE or OIDC logins);
//! client certificates cannot be forwarded, so a user who has only those is told so.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use anyhow::Context;
use kube::config::{AuthInfo, ExecConfig, KubeConfigOptions};
use secrecy::ExposeSecret;

/// The current kubeconfig user's bearer token.
///
/// # Errors
/// No kubeconfig, a user without a token, a token file that cannot be read, or an exec plugin
/// that fails.
pub(crate) async fn token() -> anyhow::Result<String> {
    let config = kube::Config::from_kubeconfig(&KubeConfigOptions::default())
        .await
        .context(
            "--token-from-kubeconfig: reading the kubeconfig (KUBECONFIG or ~/.kube/config)",
        )?;
    token_of(&config.auth_info)
}

fn token_of(user: &AuthInfo) -> anyhow::Result<String> {
    if let Some(token) = &user.token {
        return Ok(token.expose_secret().trim().to_string());
    }
    if let Some(file) = &user.token_file {
        let token = std::fs::read_to_string(file).with_context(|| {
            format!("--token-from-kubeconfig: reading the user's tokenFile {file}")
        })?;
        return Ok(token.trim().to_string());
    }
    if let Some(exec) = &user.exec {
        return exec_token(exec);
    }
    anyhow::bail!(
        "--token-from-kubeconfig: the kubeconfig's current user has no token, tokenFile or exec \
         plugin (client certificates cannot be forwarded to the control plane)"
    )
}

/// Runs a client-go credential plugin and takes `status.token` from its ExecCredential.
fn exec_token(exec: &ExecConfig) -> anyhow::Result<String> {
    let command = exec
        .command
        .as_deref()
        .context("--token-from-kubeconfig: the user's exec plugin names no command")?;
    let api_version = exec
        .api_version
        .as_deref()
        .unwrap_or("client.authentication.k8s.io/v1beta1");
    let info = serde_json::json!({
        "apiVersion": api_version,
        "kind": "ExecCredential",
        "spec": {"interactive": false},
    });
    let env: HashMap<String, String> = exec
        .env
        .iter()
        .flatten()
        .filter_map(|pair| Some((pair.get("name")?.clone(), pair.get("value")?.clone())))
        .collect();
    let output = Command::new(command)
        .args(exec.args.iter().flatten())
        .envs(env)
        .env("KUBERNETES_EXEC_INFO", info.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| {
            let hint = exec.install_hint.as_deref().unwrap_or_default();
            format!("--token-from-kubeconfig: running the credential plugin {command}. {hint}")
        })?;
    anyhow::ensure!(
        output.status.success(),
        "--token-from-kubeconfig: the credential plugin {command} failed ({})",
        output.status
    );
    let credential: serde_json::Value =
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "--token-from-kubeconfig: the credential plugin {command} printed no ExecCredential"
            )
        })?;
    credential["status"]["token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .with_context(|| {
            format!(
                "--token-from-kubeconfig: the credential plugin {command} gave no token \
                 (client certificates cannot be forwarded to the control plane)"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_the_token_its_file_or_an_exec_plugin() {
        let inline = AuthInfo {
            token: Some("inline-token".to_string().into()),
            ..AuthInfo::default()
        };
        assert_eq!(token_of(&inline).expect("inline"), "inline-token");

        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "file-token\n").expect("write");
        let from_file = AuthInfo {
            token_file: Some(file.display().to_string()),
            ..AuthInfo::default()
        };
        assert_eq!(token_of(&from_file).expect("file"), "file-token");

        let plugin: ExecConfig = serde_json::from_value(serde_json::json!({
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": "sh",
            "args": ["-c", "printf '{\"kind\":\"ExecCredential\",\"status\":{\"token\":\"%s\"}}' \"$TOKEN\""],
            "env": [{"name": "TOKEN", "value": "exec-token"}],
        }))
        .expect("exec config");
        let exec = AuthInfo {
            exec: Some(plugin),
            ..AuthInfo::default()
        };
        assert_eq!(token_of(&exec).expect("exec"), "exec-token");

        let certs_only = AuthInfo {
            client_certificate: Some("cert.pem".into()),
            ..AuthInfo::default()
        };
        let error = token_of(&certs_only).expect_err("no token");
        assert!(error.to_string().contains("client certificates"), "{error}");
    }
}
