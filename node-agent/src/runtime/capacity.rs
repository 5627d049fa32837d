//! What one agent can hold, derived from its configuration and the host's limits.
//!
//! Density is capped by `vm.max_map_count`, not by memory. The pooling allocator protects a guard
//! page below every fiber stack when the pool is created (2 mappings per stack), and a live linear
//! memory whose slot is not fully accessible splits its slot in two (2 more). The agent reads the
//! limit at startup, sizes its pool to what the limit allows and says what to raise it to.

use super::config::RuntimeConfig;

/// Kernel mappings each sandbox may need: a stack guard page and a partly accessible memory slot.
pub const MAPPINGS_PER_SANDBOX: u64 = 4;
/// Mappings left for everything else in the process (code, heap, thread stacks, libraries).
pub const RESERVED_MAPPINGS: u64 = 4096;
/// The `vm.max_map_count` that lets the default 100,000 sandboxes fit.
pub const RECOMMENDED_MAX_MAP_COUNT: u64 = 1_048_576;

/// What an agent admits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Sandboxes the agent admits at most.
    pub max_sandboxes: u32,
    /// Sum of per-sandbox memory requests the agent admits at most.
    pub memory_bytes: u64,
    /// `kubernetes.io/arch` of this agent.
    pub arch: &'static str,
    /// The WebAssembly proposals beyond the default set that workloads may enable here.
    pub wasm_features: flotilla_model::wasm::FeatureSet,
    /// Why `max_sandboxes` is what it is.
    pub limited_by: String,
}

/// The `kubernetes.io/arch` name of the architecture this agent was built for.
pub fn kubernetes_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Reads `vm.max_map_count`, if the host exposes it.
pub fn read_max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads the host's total memory in bytes from `/proc/meminfo`.
pub fn read_mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Derives the capacity an agent can honour.
///
/// `memory_limit` caps admitted memory requests (default: the host's memory).
pub fn derive(
    config: &RuntimeConfig,
    max_map_count: Option<u64>,
    memory_limit: Option<u64>,
) -> Capacity {
    let configured = u64::from(config.max_sandboxes);
    let (max_sandboxes, limited_by) = match max_map_count {
        Some(maps) => {
            let allowed = maps.saturating_sub(RESERVED_MAPPINGS) / MAPPINGS_PER_SANDBOX;
            if allowed < configured {
                (
                    allowed,
                    format!(
                        "vm.max_map_count={maps} allows {allowed} sandboxes ({MAPPINGS_PER_SANDBOX} \
                         mappings each); raise it with `sysctl -w vm.max_map_count=\
                         {RECOMMENDED_MAX_MAP_COUNT}` to hold {configured}"
                    ),
                )
            } else {
                (configured, "configured max-sandboxes".to_string())
            }
        }
        None => (configured, "configured max-sandboxes".to_string()),
    };
    Capacity {
        max_sandboxes: u32::try_from(max_sandboxes).unwrap_or(u32::MAX),
        memory_bytes: memory_limit.or_else(read_mem_total).unwrap_or(u64::MAX),
        arch: kubernetes_arch(),
        wasm_features: config.wasm_features,
        limited_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_map_count_caps_density_and_says_what_to_raise() {
        let config = RuntimeConfig::default();
        let cap = derive(&config, Some(65_530), Some(1 << 30));
        assert_eq!(cap.max_sandboxes, ((65_530 - RESERVED_MAPPINGS) / 4) as u32);
        assert!(cap.limited_by.contains("vm.max_map_count=65530"));
        assert!(cap.limited_by.contains("1048576"));
    }

    #[test]
    fn raised_map_count_honours_configuration() {
        let config = RuntimeConfig::default();
        let cap = derive(&config, Some(RECOMMENDED_MAX_MAP_COUNT), Some(1 << 30));
        assert_eq!(cap.max_sandboxes, config.max_sandboxes);
        assert_eq!(cap.limited_by, "configured max-sandboxes");
    }

    #[test]
    fn arch_uses_kubernetes_names() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(kubernetes_arch(), "amd64");
        #[cfg(target_arch = "aarch64")]
        assert_eq!(kubernetes_arch(), "arm64");
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        assert_eq!(kubernetes_arch(), std::env::consts::ARCH);
    }
}
