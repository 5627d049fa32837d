//! `flotilla rollout status|history|undo`: follow a workload's update, list its revisions, and
//! go back to an old one, as `kubectl rollout` does for a Deployment.

use std::time::Duration;

use anyhow::bail;
use flotilla_model::Workload;
use flotilla_proto::control::v1::{ApplyRequest, watch_event};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::control::{condition, connect, decode, get_workload, watch_workloads};

/// Where an update stands, from the workload's status.
enum Progress {
    /// Every replica runs the current revision.
    Done(String),
    /// On its way; what to show.
    Waiting(String),
    /// Past its progress deadline.
    Failed(String),
}

fn progress(workload: &Workload) -> Progress {
    let status = workload.status.clone().unwrap_or_default();
    if status.observed_generation < workload.metadata.generation {
        return Progress::Waiting("waiting for the control plane to see the change".into());
    }
    let revision = status.revision;
    match condition(workload, "Progressing") {
        Some(c) if c.reason == "TemplateAvailable" => Progress::Done(format!(
            "revision {revision} rolled out: {} replicas available",
            status.available_replicas
        )),
        Some(c) if c.status == "False" => Progress::Failed(format!("{}: {}", c.reason, c.message)),
        _ => {
            let desired = u64::try_from(workload.spec.replicas).unwrap_or(0);
            let updated_available = status.revisions.first().map_or(0, |r| r.available_replicas);
            let old = status.replicas.saturating_sub(status.updated_replicas);
            let mut line = format!(
                "revision {revision}: {} of {desired} updated replicas placed, \
                 {updated_available} available",
                status.updated_replicas
            );
            if old > 0 {
                line.push_str(&format!(", {old} old replicas left"));
            }
            if let Some(c) = condition(workload, "Ready").filter(|c| c.status == "False") {
                line.push_str(&format!(" ({}: {})", c.reason, c.message));
            }
            Progress::Waiting(line)
        }
    }
}

/// `flotilla rollout status NAME`: prints progress until the current revision runs on every
/// replica; fails past the progress deadline or `timeout`.
pub async fn status(server: &str, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let mut workload = get_workload(&mut client, "", name).await?;
    let key = workload.key();
    let mut watch = watch_workloads(&mut client, &key.namespace).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut shown = String::new();
    loop {
        match progress(&workload) {
            Progress::Done(line) => {
                println!("{name}: {line}");
                return Ok(());
            }
            Progress::Failed(line) => bail!("{name}: the update failed: {line}"),
            Progress::Waiting(line) if line != shown => {
                println!("{name}: {line}");
                shown = line;
            }
            Progress::Waiting(_) => {}
        }
        let event = match tokio::time::timeout_at(deadline, watch.next()).await {
            Err(_) => bail!(
                "timed out after {} waiting for {name}: {shown}",
                humantime::format_duration(timeout)
            ),
            Ok(None) => bail!("the control plane closed the watch"),
            Ok(Some(event)) => event.map_err(|s| anyhow::anyhow!("watch: {}", s.message()))?,
        };
        for object in &event.objects {
            let changed = decode(object)?;
            if changed.key() != key {
                continue;
            }
            if event.r#type == watch_event::Type::Deleted as i32 {
                bail!("workload {key} was deleted while waiting");
            }
            workload = changed;
        }
    }
}

/// `flotilla rollout history NAME`: the revisions kept, newest first.
pub async fn history(server: &str, name: &str) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let workload = get_workload(&mut client, "", name).await?;
    let status = workload.status.clone().unwrap_or_default();
    println!(
        "{:>8}  {:<16} {:>8} {:>6} {:>9}  TEMPLATE",
        "REVISION", "HASH", "REPLICAS", "READY", "AVAILABLE"
    );
    for r in &status.revisions {
        let template = r.template.as_deref().map_or_else(String::new, |t| {
            let module = t.module.sha256.get(..12).unwrap_or(&t.module.sha256);
            let mut line = format!("module {module}");
            if !t.args.is_empty() {
                line.push_str(&format!(" args [{}]", t.args.join(" ")));
            }
            line
        });
        let current = if r.revision == status.revision {
            " (current)"
        } else {
            ""
        };
        println!(
            "{:>8}  {:<16} {:>8} {:>6} {:>9}  {template}{current}",
            r.revision, r.template_hash, r.replicas, r.ready_replicas, r.available_replicas
        );
    }
    Ok(())
}

/// `flotilla rollout undo NAME [--to-revision N]`: applies an old revision's template (the
/// previous one by default), keeping the replica count and the placement and update settings.
pub async fn undo(server: &str, name: &str, to_revision: Option<u64>) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    for _ in 0..5 {
        let mut workload = get_workload(&mut client, "", name).await?;
        let status = workload.status.take().unwrap_or_default();
        let target = status
            .rollback_target(to_revision)
            .map_err(|message| anyhow::anyhow!("{name}: {message}"))?;
        let Some(template) = target.template.as_deref() else {
            bail!("{name}: revision {} has no template", target.revision);
        };
        workload.spec = workload.spec.with_template(template);
        let manifest = serde_json::to_vec(&workload)?;
        match client.apply(ApplyRequest { manifest }).await {
            Ok(_) => {
                println!(
                    "wasmworkload.flotilla.dev/{name} rolled back to revision {}",
                    target.revision
                );
                return Ok(());
            }
            // Someone else wrote in between (resourceVersion is stale): read again.
            Err(status) if status.code() == Code::Aborted => continue,
            Err(status) => bail!("{}", status.message()),
        }
    }
    bail!("workload {name} kept changing; try again")
}
