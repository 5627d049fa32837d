//! Static workload manifests: `WasmWorkload` YAML files the agent runs without a control plane,
//! like kubelet's static pods.
//!
//! They use the one `WasmWorkload` schema of [`flotilla_model`], with the static-manifest module
//! rule: `spec.module.path` names a file relative to the manifest, optionally pinned by
//! `spec.module.sha256`. Unknown fields are rejected, and every error names the file and the
//! field.
//!
//! ```yaml
//! apiVersion: flotilla.dev/v1alpha1
//! kind: WasmWorkload
//! metadata:
//!   name: hello
//! spec:
//!   module:
//!     path: hello.wasm
//!   replicas: 2
//!   restartPolicy: OnFailure
//!   resources:
//!     limits: { memory: 16Mi, cpuTime: 2s, logs: 64Ki }
//! ```

use std::path::{Path, PathBuf};

use flotilla_model::{ModuleRule, ValidationError, Workload};
use flotilla_proto::agent::v1::{ModuleSource, WorkloadSpec, module_source};
use flotilla_proto::from_model::agent_workload_spec;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Why a manifest was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("reading {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The YAML does not match the schema, or a field is invalid.
    #[error("{0}: {1}")]
    Invalid(PathBuf, ValidationError),
}

/// Reads every `*.yaml`/`*.yml` file in `dir` (sorted) into workload specs. Each file may hold
/// several documents separated by `---`.
///
/// # Errors
/// Fails only if the directory cannot be read; a bad file is returned as an error in its slot so
/// that the caller can report it and go on with the others.
pub fn load_dir(dir: &Path) -> std::io::Result<Vec<Result<WorkloadSpec, ManifestError>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut specs = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => specs.extend(parse(&text, &file)),
            Err(e) => specs.push(Err(ManifestError::Read(file, e))),
        }
    }
    Ok(specs)
}

/// Parses the documents of one manifest file. Module paths resolve against the file's directory.
pub fn parse(text: &str, file: &Path) -> Vec<Result<WorkloadSpec, ManifestError>> {
    let invalid = |e: ValidationError| ManifestError::Invalid(file.to_path_buf(), e);
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let workload = Workload::deserialize(doc).map_err(|e| {
                invalid(ValidationError(vec![flotilla_model::FieldError {
                    field: e.location().map_or("manifest".into(), |l| {
                        format!("line {} column {}", l.line(), l.column())
                    }),
                    message: e.to_string(),
                }]))
            })?;
            workload
                .validate_with(ModuleRule::LocalPath)
                .map_err(invalid)?;
            Ok(to_spec(&workload, file))
        })
        .collect()
}

/// Converts a validated workload into the agent's spec.
fn to_spec(workload: &Workload, file: &Path) -> WorkloadSpec {
    let spec = &workload.spec;
    let base = file.parent().unwrap_or(Path::new("."));
    let module_path = base.join(spec.module.path.as_deref().unwrap_or_default());
    let module = ModuleSource {
        source: Some(module_source::Source::Path(
            module_path.to_string_lossy().into_owned(),
        )),
        sha256: spec.module.sha256.clone(),
    };
    let replicas = u32::try_from(spec.replicas).unwrap_or(u32::MAX);
    let mut out = agent_workload_spec(spec, workload.metadata.name.clone(), 0, replicas, module);
    out.namespace = workload.key().namespace;
    out.generation = generation_of(&out);
    out
}

/// A generation derived from the spec's content, so that an edited manifest replaces sandboxes
/// and an unchanged one does not.
fn generation_of(spec: &WorkloadSpec) -> u64 {
    let mut without_replicas = spec.clone();
    without_replicas.replicas = 0;
    let digest = Sha256::digest(prost::Message::encode_to_vec(&without_replicas));
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    // Keep it short enough to read in sandbox ids.
    u64::from_be_bytes(bytes) >> 40
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
apiVersion: flotilla.dev/v1alpha1
kind: WasmWorkload
metadata:
  name: hello
spec:
  module:
    path: hello.wasm
  replicas: 3
  restartPolicy: OnFailure
  activeDeadlineSeconds: 5
  resources:
    requests: { memory: 1Mi }
    limits: { memory: 16Mi, cpuTime: 1500ms, logs: 4Ki }
"#;

    #[test]
    fn parses_a_full_manifest() {
        let specs = parse(HELLO, Path::new("/srv/manifests/hello.yaml"));
        let spec = specs.into_iter().next().expect("one doc").expect("valid");
        assert_eq!(spec.name, "hello");
        assert_eq!(spec.replicas, 3);
        assert_eq!(
            spec.restart_policy,
            flotilla_proto::agent::v1::RestartPolicy::OnFailure as i32
        );
        let res = spec.resources.expect("resources");
        assert_eq!(res.memory_limit_bytes, 16 << 20);
        assert_eq!(res.memory_request_bytes, 1 << 20);
        assert_eq!(res.cpu_limit_ms, 1500);
        assert_eq!(res.deadline_ms, 5000);
        assert_eq!(res.log_limit_bytes, 4096);
        let source = spec.module.and_then(|m| m.source);
        assert_eq!(
            source,
            Some(module_source::Source::Path(
                "/srv/manifests/hello.wasm".into()
            ))
        );
    }

    #[test]
    fn volumes_reach_the_agent_spec_as_mounts() {
        let manifest = format!(
            "{HELLO}  volumes:
    - {{name: scratch, emptyDir: {{medium: Memory}}}}
    - {{name: data, hostPath: {{path: /srv/data}}}}
  volumeMounts:
    - {{name: scratch, mountPath: /tmp}}
    - {{name: scratch, mountPath: /logs, subPath: app/logs}}
    - {{name: data, mountPath: /data, subPath: models}}
"
        );
        let spec = parse(&manifest, Path::new("a.yaml"))
            .remove(0)
            .expect("valid");
        let mounts: Vec<(&str, &str, &str, bool)> = spec
            .volumes
            .iter()
            .map(|v| {
                (
                    v.name.as_str(),
                    v.mount_path.as_str(),
                    v.sub_path.as_str(),
                    v.read_only,
                )
            })
            .collect();
        assert_eq!(
            mounts,
            [
                ("scratch", "/tmp", "", false),
                ("scratch", "/logs", "app/logs", false),
                ("data", "/data", "models", true),
            ]
        );
        assert_eq!(
            spec.volumes[0].source,
            Some(flotilla_proto::agent::v1::volume::Source::EmptyDir(
                flotilla_proto::agent::v1::EmptyDir {
                    size_limit_bytes: 0,
                    memory: true,
                }
            ))
        );
    }

    #[test]
    fn generation_follows_content_not_replicas() {
        let a = parse(HELLO, Path::new("a.yaml")).remove(0).expect("valid");
        let scaled = HELLO.replace("replicas: 3", "replicas: 5");
        let b = parse(&scaled, Path::new("a.yaml"))
            .remove(0)
            .expect("valid");
        assert_eq!(a.generation, b.generation);
        let edited = HELLO.replace("cpuTime: 1500ms", "cpuTime: 2s");
        let c = parse(&edited, Path::new("a.yaml"))
            .remove(0)
            .expect("valid");
        assert_ne!(a.generation, c.generation);
    }

    #[test]
    fn bad_manifests_name_the_file_and_the_field() {
        let cases = [
            (
                HELLO.replace("replicas: 3", "replicas: -1"),
                "spec.replicas: must be >= 0",
            ),
            (
                HELLO.replace("replicas: 3", "replicaz: 3"),
                "unknown field `replicaz`",
            ),
            (
                HELLO.replace("OnFailure", "Sometimes"),
                "unknown variant `Sometimes`",
            ),
            (
                HELLO.replace("16Mi", "16Mo"),
                "spec.resources.limits.memory",
            ),
            (
                HELLO.replace("1500ms", "fast"),
                "spec.resources.limits.cpuTime",
            ),
            (HELLO.replace("v1alpha1", "v9"), "apiVersion"),
            (
                HELLO.replace("path: hello.wasm", "url: https://x/y.wasm"),
                "spec.module.path: required",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(&text, Path::new("bad.yaml"))
                .remove(0)
                .expect_err(needle);
            let shown = err.to_string();
            assert!(shown.contains(needle), "{needle}: {shown}");
            assert!(shown.starts_with("bad.yaml: "), "{shown}");
        }
    }
}
