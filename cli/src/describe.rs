//! What `flotilla describe workload` shows of a workload's template beyond its module and
//! arguments: its environment, mounts and volumes, as `kubectl describe pod` lays them out.
//! Values from ConfigMaps and Secrets appear as references, never as values.

use flotilla_model::{EnvFromSource, EnvVar, Volume, VolumeMount, WorkloadSpec};
use flotilla_proto::from_model;

/// The `Environment:`, `Mounts:` and `Volumes:` sections of `spec`, one line each; none for
/// an empty section.
pub fn template_sections(spec: &WorkloadSpec) -> Vec<String> {
    let mut lines = Vec::new();
    if !spec.env.is_empty() || !spec.env_from.is_empty() {
        lines.push("Environment:".to_string());
        lines.extend(spec.env.iter().map(|var| format!("  {}", env_var(var))));
        lines.extend(
            spec.env_from
                .iter()
                .map(|from| format!("  {}", env_from(from))),
        );
    }
    if !spec.volume_mounts.is_empty() {
        lines.push("Mounts:".to_string());
        lines.extend(spec.volume_mounts.iter().map(|mount| {
            let writable = spec
                .volumes
                .iter()
                .find(|v| v.name == mount.name)
                .is_some_and(|v| v.writable(mount));
            format!("  {}", volume_mount(mount, writable))
        }));
    }
    if !spec.volumes.is_empty() {
        lines.push("Volumes:".to_string());
        lines.extend(spec.volumes.iter().map(|v| format!("  {}", volume(v))));
    }
    lines
}

/// `NAME: value`, or where the value comes from (read from the agent's form of it).
fn env_var(var: &EnvVar) -> String {
    let var = from_model::env_var(var);
    let value = match &var.value_from {
        _ if !var.field_path.is_empty() => format!("<set to the field '{}'>", var.field_path),
        Some(key) => format!(
            "<set to the key '{}' of {} '{}'>{}",
            key.key,
            key.kind().noun(),
            key.name,
            optional(key.optional)
        ),
        None => var.value,
    };
    format!("{}: {value}", var.name)
}

/// Every key of an object, with its prefix.
fn env_from(from: &EnvFromSource) -> String {
    let Some(from) = from_model::env_from(from) else {
        return "<envFrom without a source>".to_string();
    };
    let prefix = if from.prefix.is_empty() {
        String::new()
    } else {
        format!(" with prefix '{}'", from.prefix)
    };
    format!(
        "<every key of {} '{}'{prefix}>{}",
        from.kind().noun(),
        from.name,
        optional(from.optional)
    )
}

/// `/path from volume (ro|rw[, path "sub"])`.
fn volume_mount(mount: &VolumeMount, writable: bool) -> String {
    let access = if writable { "rw" } else { "ro" };
    let sub_path = mount
        .sub_path
        .as_deref()
        .map(|sub| format!(", path \"{sub}\""))
        .unwrap_or_default();
    format!(
        "{} from {} ({access}{sub_path})",
        mount.mount_path, mount.name
    )
}

/// `name: Kind source, settings`.
fn volume(v: &Volume) -> String {
    let items = |items: &[flotilla_model::KeyToPath]| {
        if items.is_empty() {
            String::new()
        } else {
            let pairs: Vec<String> = items
                .iter()
                .map(|i| format!("{} -> {}", i.key, i.path))
                .collect();
            format!(", items {}", pairs.join(", "))
        }
    };
    let source = if let Some(empty) = &v.empty_dir {
        let mut settings = Vec::new();
        if empty.medium == Some(flotilla_model::StorageMedium::Memory) {
            settings.push("medium Memory".to_string());
        }
        if let Some(limit) = &empty.size_limit {
            settings.push(format!("sizeLimit {limit}"));
        }
        if settings.is_empty() {
            "EmptyDir".to_string()
        } else {
            format!("EmptyDir ({})", settings.join(", "))
        }
    } else if let Some(map) = &v.config_map {
        format!(
            "ConfigMap {}{}{}",
            map.name,
            items(&map.items),
            optional(map.optional == Some(true))
        )
    } else if let Some(secret) = &v.secret {
        format!(
            "Secret {}{}{}",
            secret.secret_name,
            items(&secret.items),
            optional(secret.optional == Some(true))
        )
    } else if let Some(host) = &v.host_path {
        format!("HostPath {}", host.path)
    } else {
        "<no source>".to_string()
    };
    format!("{}: {source}", v.name)
}

fn optional(optional: bool) -> &'static str {
    if optional { " (optional)" } else { "" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_references_mounts_and_volumes_but_no_secret_values() {
        let spec: WorkloadSpec = serde_yaml::from_str(
            r#"
module: {sha256: "0000000000000000000000000000000000000000000000000000000000000000"}
env:
  - {name: MODE, value: fast}
  - name: TOKEN
    valueFrom: {secretKeyRef: {name: creds, key: token}}
  - name: GREETING
    valueFrom: {configMapKeyRef: {name: app, key: greeting, optional: true}}
  - name: NODE
    valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
envFrom:
  - {prefix: APP_, configMapRef: {name: app}}
volumes:
  - {name: config, configMap: {name: app, items: [{key: greeting, path: conf/hello.txt}]}}
  - {name: creds, secret: {secretName: creds}}
  - {name: scratch, emptyDir: {medium: Memory, sizeLimit: 1Mi}}
  - {name: data, hostPath: {path: /srv/data}}
volumeMounts:
  - {name: config, mountPath: /config}
  - {name: scratch, mountPath: /logs, subPath: app/logs}
  - {name: data, mountPath: /data}
"#,
        )
        .expect("spec");
        assert_eq!(
            template_sections(&spec),
            [
                "Environment:",
                "  MODE: fast",
                "  TOKEN: <set to the key 'token' of secret 'creds'>",
                "  GREETING: <set to the key 'greeting' of configmap 'app'> (optional)",
                "  NODE: <set to the field 'spec.nodeName'>",
                "  <every key of configmap 'app' with prefix 'APP_'>",
                "Mounts:",
                "  /config from config (ro)",
                "  /logs from scratch (rw, path \"app/logs\")",
                "  /data from data (ro)",
                "Volumes:",
                "  config: ConfigMap app, items greeting -> conf/hello.txt",
                "  creds: Secret creds",
                "  scratch: EmptyDir (medium Memory, sizeLimit 1Mi)",
                "  data: HostPath /srv/data",
            ]
        );
        assert!(template_sections(&WorkloadSpec::default()).is_empty());
    }
}
