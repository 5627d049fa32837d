//! Volumes and configuration with real sandboxes: the C guest `examples/guests/files.c` tries
//! to leave its mounts, fills a size-limited emptyDir, and reads ConfigMap files and Secret
//! environment variables, updated while it runs.

use std::path::Path;

use crate::common::*;
use flotilla_node_agent::runtime::RuntimeConfig;
use flotilla_node_agent::runtime::volumes::HostPathRule;
use flotilla_node_agent::supervisor::Supervisor;
use flotilla_proto::agent::v1::{
    ConfigKind, ConfigObject, ConfigRef, EmptyDir, EnvFrom, EnvVar, KeyRef, KeyToPath,
    RestartPolicy, SandboxPhase, Volume, WorkloadSpec, volume,
};
use flotilla_tests::privileges::{can_mount_tmpfs, rerun_without_sys_admin};

fn files_guest() -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/guests/files.wasm");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A runtime configuration keeping volumes under `volumes_dir`.
fn config_in(volumes_dir: &Path) -> RuntimeConfig {
    let mut config = runtime_config();
    config.volumes.dir = volumes_dir.to_path_buf();
    config
}

/// A supervisor keeping volumes under `volumes_dir`.
fn supervisor_in(volumes_dir: &Path) -> Supervisor {
    supervisor(config_in(volumes_dir))
}

/// A supervisor whose agent allows sandboxes to mount `host_dir`, read-only.
fn supervisor_allowing(volumes_dir: &Path, host_dir: &Path) -> Supervisor {
    let mut config = config_in(volumes_dir);
    config.volumes.host_paths = vec![HostPathRule {
        prefix: host_dir.to_path_buf(),
        writable: false,
    }];
    supervisor(config)
}

fn files_spec(name: &str, args: &[&str], volumes: Vec<Volume>) -> WorkloadSpec {
    let mut spec = spec(name, files_guest());
    spec.args = args.iter().map(|a| a.to_string()).collect();
    spec.volumes = volumes;
    spec
}

fn mount(name: &str, path: &str, read_only: bool, source: volume::Source) -> Volume {
    Volume {
        name: name.into(),
        mount_path: path.into(),
        read_only,
        source: Some(source),
        sub_path: String::new(),
    }
}

/// Runs the guest once and returns its output.
async fn run(sup: &Supervisor, spec: WorkloadSpec) -> String {
    let name = spec.name.clone();
    sup.apply(spec).await.expect("applied");
    wait_for(sup, &name, "the run to end", all_ended()).await;
    logs(sup, &name, 0)
}

fn line<'a>(output: &'a str, prefix: &str) -> &'a str {
    output
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{output}"))
}

fn scratch_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("scratch")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_leave_its_volumes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(&shared).expect("mkdir");
    std::fs::write(shared.join("inside.txt"), "inside\n").expect("write");
    std::fs::write(dir.path().join("outside.txt"), "outside\n").expect("write");
    // A symlink planted in the host directory, pointing out of it.
    std::os::unix::fs::symlink("/etc", shared.join("etc")).expect("symlink");
    std::os::unix::fs::symlink("../outside.txt", shared.join("up.txt")).expect("symlink");
    let volumes_dir = dir.path().join("volumes");
    let sup = supervisor_allowing(&volumes_dir, &shared);
    let shared_path = shared.to_string_lossy().into_owned();
    let spec = files_spec(
        "escape",
        &[
            "read",
            "/data/inside.txt",
            "read",
            "/data/../outside.txt",
            "read",
            "/data/../../../../etc/hostname",
            "read",
            "/etc/hostname",
            "read",
            "/data/etc/hostname",
            "read",
            "/data/up.txt",
            "write",
            "/data/new.txt",
            "10",
            "symlink",
            "/etc",
            "/scratch/etc",
            "read",
            "/scratch/etc/hostname",
            "symlink",
            "../../../..",
            "/scratch/up",
            "read",
            "/scratch/up/etc/hostname",
            "write",
            "/scratch/ok.txt",
            "10",
            "read",
            "/scratch/ok.txt",
        ],
        vec![
            mount("data", "/data", true, volume::Source::HostPath(shared_path)),
            mount(
                "scratch",
                "/scratch",
                false,
                volume::Source::EmptyDir(EmptyDir::default()),
            ),
        ],
    );
    let out = run(&sup, spec).await;
    assert_eq!(
        line(&out, "read /data/inside.txt"),
        "read /data/inside.txt: ok: inside"
    );
    for escape in [
        "read /data/../outside.txt",
        "read /data/../../../../etc/hostname",
        "read /etc/hostname",
        "read /data/etc/hostname",
        "read /data/up.txt",
        "write /data/new.txt",
        "read /scratch/etc/hostname",
        "read /scratch/up/etc/hostname",
    ] {
        assert!(
            line(&out, escape).contains("error"),
            "{escape} escaped:\n{out}"
        );
    }
    assert!(
        !shared.join("new.txt").exists(),
        "a read-only hostPath was written"
    );
    assert_eq!(
        line(&out, "read /scratch/ok.txt"),
        "read /scratch/ok.txt: ok: xxxxxxxxxx"
    );
    assert_eq!(
        scratch_entries(&volumes_dir),
        0,
        "the emptyDir is removed with the sandbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_the_agent_does_not_allow_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sup = supervisor_in(&dir.path().join("volumes"));
    let spec = files_spec(
        "host",
        &["read", "/host/hostname"],
        vec![mount(
            "host",
            "/host",
            true,
            volume::Source::HostPath("/etc".into()),
        )],
    );
    let error = sup.apply(spec).await.expect_err("refused");
    assert_eq!(error.reason(), "VolumeNotAllowed");
    let cause = std::error::Error::source(&error).map(ToString::to_string);
    assert!(
        cause
            .as_deref()
            .is_some_and(|c| c.contains("hostPath /etc is not allowed")),
        "{error}: {cause:?}"
    );
}

/// Needs `CAP_SYS_ADMIN` (root) to mount the tmpfs; without it, the next test covers what the
/// agent does instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_empty_dir_fails_writes_in_its_own_sandbox_only() {
    if !can_mount_tmpfs() {
        flotilla_tests::privileges::skipped(
            "size-limited and in-memory emptyDirs are tmpfs mounts, which need CAP_SYS_ADMIN \
             (run the tests as root to run this one); \
             volumes::without_cap_sys_admin_a_size_limited_empty_dir_fails_saying_why ran instead",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let volumes_dir = dir.path().join("volumes");
    let sup = supervisor_in(&volumes_dir);
    let limited = |name: &str, empty_dir: EmptyDir| {
        files_spec(
            name,
            &[
                "write",
                "/scratch/fill",
                "1048576",
                "write",
                "/scratch/small",
                "100",
            ],
            vec![mount(
                "scratch",
                "/scratch",
                false,
                volume::Source::EmptyDir(empty_dir),
            )],
        )
    };
    let size_limit = |bytes: u64| EmptyDir {
        size_limit_bytes: bytes,
        memory: false,
    };
    // `medium: Memory` without a sizeLimit: a tmpfs as large as the sandbox's memory limit.
    let mut in_memory = limited(
        "in-memory",
        EmptyDir {
            size_limit_bytes: 0,
            memory: true,
        },
    );
    if let Some(resources) = in_memory.resources.as_mut() {
        resources.memory_limit_bytes = 768 << 10;
    }
    let (small, roomy, in_memory) = tokio::join!(
        run(&sup, limited("small", size_limit(256 << 10))),
        run(&sup, limited("roomy", size_limit(4 << 20))),
        run(&sup, in_memory),
    );
    let filled = |output: &str| -> u64 {
        let fill = line(output, "write /scratch/fill");
        assert!(fill.contains("No space left on device"), "{output}");
        fill.split_whitespace()
            .nth(3)
            .and_then(|n| n.parse().ok())
            .expect("bytes written")
    };
    let written = filled(&small);
    assert!(written <= 256 << 10, "{written} bytes went past the limit");
    assert!(written >= 128 << 10, "only {written} bytes fit");
    let written = filled(&in_memory);
    assert!(
        written <= 768 << 10,
        "{written} bytes went past the memory limit"
    );
    assert!(written >= 512 << 10, "only {written} bytes fit");
    assert_eq!(
        line(&roomy, "write /scratch/fill"),
        "write /scratch/fill: ok: 1048576"
    );
    assert_eq!(
        line(&roomy, "write /scratch/small"),
        "write /scratch/small: ok: 100"
    );
    let statuses = sup.list(Some("small"));
    assert_eq!(
        statuses[0].phase,
        SandboxPhase::Succeeded as i32,
        "the guest saw an error, no more"
    );
    assert_eq!(
        scratch_entries(&volumes_dir),
        0,
        "both tmpfs are unmounted and removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_paths_share_their_volume_and_stay_beneath_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(shared.join("site")).expect("mkdir");
    std::fs::write(shared.join("site/index.html"), "hello\n").expect("write");
    std::fs::create_dir_all(dir.path().join("outside")).expect("mkdir");
    std::fs::write(dir.path().join("outside/secret.txt"), "outside\n").expect("write");
    // A symlink planted in the host directory, pointing out of it.
    std::os::unix::fs::symlink("../outside", shared.join("out")).expect("symlink");
    let volumes_dir = dir.path().join("volumes");
    let sup = supervisor_allowing(&volumes_dir, &shared);
    let shared_path = shared.to_string_lossy().into_owned();
    let sub = |mut volume: Volume, sub_path: &str| {
        volume.sub_path = sub_path.into();
        volume
    };
    let scratch = || volume::Source::EmptyDir(EmptyDir::default());
    let mut spec = files_spec(
        "sub-paths",
        &[
            "write",
            "/logs/app.log",
            "10",
            "read",
            "/all/var/logs/app.log",
            "read",
            "/site/index.html",
            "read",
            "/site/../out/secret.txt",
        ],
        vec![
            mount("scratch", "/all", false, scratch()),
            sub(mount("scratch", "/logs", false, scratch()), "var/logs"),
            sub(
                mount(
                    "web",
                    "/site",
                    true,
                    volume::Source::HostPath(shared_path.clone()),
                ),
                "site",
            ),
        ],
    );
    spec.restart_policy = RestartPolicy::Never as i32;
    let out = run(&sup, spec).await;
    assert_eq!(
        line(&out, "write /logs/app.log"),
        "write /logs/app.log: ok: 10"
    );
    assert_eq!(
        line(&out, "read /all/var/logs/app.log"),
        "read /all/var/logs/app.log: ok: xxxxxxxxxx",
        "both mounts are one emptyDir, the subPath made in it"
    );
    assert_eq!(
        line(&out, "read /site/index.html"),
        "read /site/index.html: ok: hello"
    );
    assert!(
        line(&out, "read /site/../out/secret.txt").contains("error"),
        "{out}"
    );
    assert_eq!(scratch_entries(&volumes_dir), 0, "removed with the sandbox");

    // A subPath through the planted symlink would leave the volume: refused.
    let mut escape = files_spec(
        "sub-path-escape",
        &["read", "/x/secret.txt"],
        vec![sub(
            mount("web", "/x", true, volume::Source::HostPath(shared_path)),
            "out",
        )],
    );
    escape.restart_policy = RestartPolicy::Never as i32;
    let out = run(&sup, escape).await;
    assert!(!out.contains("outside"), "{out}");
    let statuses = sup.list(Some("sub-path-escape"));
    let last = statuses[0].last_termination.as_ref().expect("termination");
    assert_eq!(last.reason, "VolumeError");
    assert!(
        last.message.starts_with("volume web subPath out: "),
        "{}",
        last.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_downward_api_names_the_sandbox_its_namespace_and_node() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = config_in(&dir.path().join("volumes"));
    config.node_name = "edge-7".into();
    let sup = supervisor(config);
    let mut spec = files_spec(
        "fields",
        &["env", "SANDBOX", "env", "NAMESPACE", "env", "NODE"],
        vec![],
    );
    spec.restart_policy = RestartPolicy::Never as i32;
    spec.namespace = "shop".into();
    spec.replicas = 2;
    let field = |name: &str, path: &str| EnvVar {
        name: name.into(),
        field_path: path.into(),
        ..EnvVar::default()
    };
    spec.env = vec![
        field("SANDBOX", "metadata.name"),
        field("NAMESPACE", "metadata.namespace"),
        field("NODE", "spec.nodeName"),
    ];
    sup.apply(spec).await.expect("applied");
    let statuses = wait_for(&sup, "fields", "the runs to end", all_ended()).await;
    for status in &statuses {
        let out = logs(&sup, "fields", status.replica);
        assert_eq!(
            line(&out, "env SANDBOX"),
            format!("env SANDBOX: {}", status.sandbox_id),
            "each replica sees its own name"
        );
        assert_eq!(line(&out, "env NAMESPACE"), "env NAMESPACE: shop");
        assert_eq!(line(&out, "env NODE"), "env NODE: edge-7");
    }
}

/// The variable `name` from `key` of the Secret `secret`.
fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(KeyRef {
            kind: ConfigKind::Secret as i32,
            name: secret.into(),
            key: key.into(),
            optional: false,
        }),
        ..EnvVar::default()
    }
}

fn object(kind: ConfigKind, name: &str, data: &[(&str, &str)]) -> ConfigObject {
    ConfigObject {
        kind: kind as i32,
        namespace: "default".into(),
        name: name.into(),
        data: data
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
    }
}

fn config_volume(kind: ConfigKind, name: &str, path: &str) -> Volume {
    mount(
        name,
        path,
        true,
        volume::Source::Config(ConfigRef {
            kind: kind as i32,
            name: name.into(),
            optional: false,
            items: vec![],
        }),
    )
}

/// A ConfigMap volume of only the keys `items` lists (key, path).
fn config_items_volume(name: &str, path: &str, items: &[(&str, &str)]) -> Volume {
    mount(
        name,
        path,
        true,
        volume::Source::Config(ConfigRef {
            kind: ConfigKind::ConfigMap as i32,
            name: name.into(),
            optional: false,
            items: items
                .iter()
                .map(|(key, path)| KeyToPath {
                    key: key.to_string(),
                    path: path.to_string(),
                })
                .collect(),
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_put_chosen_keys_at_their_paths_and_follow_updates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sup = supervisor_in(&dir.path().join("volumes"));
    let files = sup.runtime().config_files();
    let app = |greeting: &str| {
        object(
            ConfigKind::ConfigMap,
            "app",
            &[("greeting", greeting), ("mode", "fast"), ("other", "x")],
        )
    };
    files.apply(vec![app("v1")], true, vec![]).expect("config");
    let spec = files_spec(
        "items",
        &[
            "read",
            "/config/conf/hello.txt",
            "read",
            "/config/top",
            "read",
            "/config/greeting",
            "read",
            "/config/other",
            "poll",
            "/config/conf/hello.txt",
            "v2",
            "10000",
        ],
        vec![config_items_volume(
            "app",
            "/config",
            &[("greeting", "conf/hello.txt"), ("mode", "top")],
        )],
    );
    sup.apply(spec).await.expect("applied");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !logs(&sup, "items", 0).contains("read /config/other") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            logs(&sup, "items", 0)
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    files.apply(vec![app("v2")], true, vec![]).expect("update");
    wait_for(&sup, "items", "the run to end", all_ended()).await;
    let out = logs(&sup, "items", 0);
    assert_eq!(
        line(&out, "read /config/conf/hello.txt"),
        "read /config/conf/hello.txt: ok: v1"
    );
    assert_eq!(line(&out, "read /config/top"), "read /config/top: ok: fast");
    assert!(
        line(&out, "read /config/greeting").contains("No such file"),
        "a listed key is only at its path:\n{out}"
    );
    assert!(
        line(&out, "read /config/other").contains("No such file"),
        "keys not listed are absent:\n{out}"
    );
    assert_eq!(
        line(&out, "poll /config/conf/hello.txt"),
        "poll /config/conf/hello.txt: saw v2",
        "the running guest sees the update at the item's path"
    );

    // A listed key the object lacks fails the sandbox, as for a Pod, with the key named.
    let mut missing = files_spec(
        "missing-key",
        &["read", "/config/x"],
        vec![config_items_volume("app", "/config", &[("nope", "x")])],
    );
    missing.restart_policy = RestartPolicy::Never as i32;
    sup.apply(missing).await.expect("applied");
    let statuses = wait_for(&sup, "missing-key", "the failure", all_ended()).await;
    let last = statuses[0].last_termination.as_ref().expect("termination");
    assert_eq!(last.reason, "ConfigError");
    assert_eq!(last.message, "configmap default/app has no key nope");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_maps_and_secrets_reach_files_and_environment_and_update_in_place() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sup = supervisor_in(&dir.path().join("volumes"));
    let files = sup.runtime().config_files();
    files
        .apply(
            vec![
                object(
                    ConfigKind::ConfigMap,
                    "app",
                    &[("greeting", "v1"), ("mode", "fast")],
                ),
                object(ConfigKind::Secret, "creds", &[("password", "s3cret")]),
            ],
            true,
            vec![],
        )
        .expect("config");

    let mut spec = files_spec(
        "config",
        &[
            "read",
            "/config/greeting",
            "env",
            "PASSWORD",
            "env",
            "APP_mode",
            "read",
            "/secrets/password",
            "write",
            "/config/greeting",
            "1",
            "poll",
            "/config/greeting",
            "v2",
            "10000",
        ],
        vec![
            config_volume(ConfigKind::ConfigMap, "app", "/config"),
            config_volume(ConfigKind::Secret, "creds", "/secrets"),
        ],
    );
    spec.env = vec![secret_env("PASSWORD", "creds", "password")];
    spec.env_from = vec![EnvFrom {
        kind: ConfigKind::ConfigMap as i32,
        name: "app".into(),
        prefix: "APP_".into(),
        optional: false,
    }];
    sup.apply(spec).await.expect("applied");
    // Once the guest has read v1, the ConfigMap changes; the running guest sees the new file.
    let read_first = || logs(&sup, "config", 0).contains("read /config/greeting: ok: v1");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !read_first() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            logs(&sup, "config", 0)
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    files
        .apply(
            vec![object(
                ConfigKind::ConfigMap,
                "app",
                &[("greeting", "v2"), ("mode", "fast")],
            )],
            false,
            vec![],
        )
        .expect("update");
    wait_for(&sup, "config", "the run to end", all_ended()).await;
    let out = logs(&sup, "config", 0);
    assert_eq!(line(&out, "env PASSWORD"), "env PASSWORD: s3cret");
    assert_eq!(line(&out, "env APP_mode"), "env APP_mode: fast");
    assert_eq!(
        line(&out, "read /secrets/password"),
        "read /secrets/password: ok: s3cret"
    );
    assert!(
        line(&out, "write /config/greeting").contains("error"),
        "read-only:\n{out}"
    );
    assert_eq!(
        line(&out, "poll /config/greeting"),
        "poll /config/greeting: saw v2"
    );
    assert_eq!(sup.list(Some("config"))[0].restart_count, 0, "no restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_fails_the_sandbox_with_a_clear_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sup = supervisor_in(&dir.path().join("volumes"));
    let mut spec = files_spec("needs-secret", &["env", "TOKEN"], vec![]);
    spec.restart_policy = RestartPolicy::Never as i32;
    spec.env = vec![secret_env("TOKEN", "absent", "token")];
    sup.apply(spec).await.expect("applied");
    let statuses = wait_for(&sup, "needs-secret", "the failure", all_ended()).await;
    let last = statuses[0].last_termination.as_ref().expect("termination");
    assert_eq!(last.reason, "ConfigError");
    assert_eq!(last.message, "secret default/absent not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_waiting_for_a_secret_starts_as_soon_as_it_arrives() {
    use flotilla_node_agent::metrics::Metrics;
    use flotilla_node_agent::supervisor::SupervisorConfig;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = config_in(&dir.path().join("volumes"));
    // A backoff far longer than the wait below: only the arrival can start it in time.
    let mut supervision = SupervisorConfig::default();
    supervision.backoff.initial = std::time::Duration::from_secs(600);
    let sup = Supervisor::new(runtime(config), supervision, Metrics::new());
    let mut spec = files_spec("late-secret", &["env", "TOKEN"], vec![]);
    spec.restart_policy = RestartPolicy::OnFailure as i32;
    spec.env = vec![secret_env("TOKEN", "late", "token")];
    sup.apply(spec).await.expect("applied");
    wait_for(&sup, "late-secret", "the config error", |s| {
        s.first().is_some_and(|s| s.reason == "CrashLoopBackOff")
    })
    .await;
    sup.runtime()
        .config_files()
        .apply(
            vec![object(ConfigKind::Secret, "late", &[("token", "t0k3n")])],
            true,
            vec![],
        )
        .expect("config");
    sup.config_changed();
    let ran = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        wait_for(
            &sup,
            "late-secret",
            "the run",
            all_in(SandboxPhase::Succeeded),
        ),
    )
    .await;
    assert!(
        ran.is_ok(),
        "still waiting out the backoff: {:?}",
        sup.list(Some("late-secret"))
    );
    assert_eq!(
        line(&logs(&sup, "late-secret", 0), "env TOKEN"),
        "env TOKEN: t0k3n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_dir_outlives_a_restart_and_goes_with_its_sandbox() {
    use flotilla_node_agent::metrics::Metrics;
    use flotilla_node_agent::supervisor::SupervisorConfig;
    let dir = tempfile::tempdir().expect("temp dir");
    let volumes_dir = dir.path().join("volumes");
    let config = config_in(&volumes_dir);
    let mut supervision = SupervisorConfig::default();
    supervision.backoff.initial = std::time::Duration::from_millis(10);
    let sup = Supervisor::new(runtime(config), supervision, Metrics::new());
    // Each run reads what the run before it wrote, then writes; restartPolicy Always.
    let mut spec = files_spec(
        "keeper",
        &["read", "/scratch/mark", "write", "/scratch/mark", "7"],
        vec![mount(
            "scratch",
            "/scratch",
            false,
            volume::Source::EmptyDir(EmptyDir::default()),
        )],
    );
    spec.restart_policy = RestartPolicy::Always as i32;
    sup.apply(spec).await.expect("applied");
    wait_for(&sup, "keeper", "a restart", |s| {
        s.first().is_some_and(|s| s.restart_count >= 1)
    })
    .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !logs(&sup, "keeper", 0).contains("read /scratch/mark: ok: xxxxxxx") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            logs(&sup, "keeper", 0)
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let out = logs(&sup, "keeper", 0);
    assert!(
        out.contains("read /scratch/mark: error"),
        "the first run found nothing:\n{out}"
    );
    assert_eq!(
        scratch_entries(&volumes_dir),
        1,
        "one directory, kept across runs"
    );
    sup.stop("keeper", None).await;
    assert_eq!(scratch_entries(&volumes_dir), 0, "removed with the sandbox");
}

/// An agent without `CAP_SYS_ADMIN` (not root) cannot mount the tmpfs a size-limited emptyDir
/// is: the sandbox fails saying so. As root, the test runs itself again without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cap_sys_admin_a_size_limited_empty_dir_fails_saying_why() {
    if can_mount_tmpfs() {
        rerun_without_sys_admin(
            "volumes::without_cap_sys_admin_a_size_limited_empty_dir_fails_saying_why",
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let sup = supervisor_in(&dir.path().join("volumes"));
    let spec = files_spec(
        "small",
        &["write", "/scratch/x", "10"],
        vec![mount(
            "scratch",
            "/scratch",
            false,
            volume::Source::EmptyDir(EmptyDir {
                size_limit_bytes: 256 << 10,
                memory: false,
            }),
        )],
    );
    let said = match sup.apply(spec).await {
        Err(error) => format!(
            "{error}: {:?}",
            std::error::Error::source(&error).map(ToString::to_string)
        ),
        Ok(_) => {
            let statuses = wait_for(&sup, "small", "the sandbox to fail", all_ended()).await;
            let (reason, message, _) = termination(only(&statuses));
            format!("{reason}: {message}")
        }
    };
    assert!(
        said.contains("needs CAP_SYS_ADMIN") && said.contains("emptyDir scratch"),
        "{said}"
    );
}
