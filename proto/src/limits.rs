//! The wire's [`Resources`] and the model's [`SandboxLimits`]: 0 on the wire is "not set".

use std::time::Duration;

use flotilla_model::SandboxLimits;

use crate::agent::v1::Resources;

impl From<&SandboxLimits> for Resources {
    fn from(limits: &SandboxLimits) -> Self {
        let millis =
            |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            memory_limit_bytes: limits.memory.unwrap_or(0),
            memory_request_bytes: limits.memory_request.unwrap_or(0),
            cpu_limit_ms: millis(limits.cpu_time),
            deadline_ms: millis(limits.deadline),
            log_limit_bytes: limits.logs.unwrap_or(0),
            max_table_elements: limits.table_elements.unwrap_or(0),
            cpu_request_millicores: limits.cpu_request.unwrap_or(0),
            cpu_limit_millicores: limits.cpu_limit.unwrap_or(0),
        }
    }
}

impl From<&Resources> for SandboxLimits {
    fn from(resources: &Resources) -> Self {
        let set = |v: u64| (v != 0).then_some(v);
        Self {
            memory: set(resources.memory_limit_bytes),
            memory_request: set(resources.memory_request_bytes),
            cpu_time: set(resources.cpu_limit_ms).map(Duration::from_millis),
            deadline: set(resources.deadline_ms).map(Duration::from_millis),
            logs: set(resources.log_limit_bytes),
            table_elements: (resources.max_table_elements != 0)
                .then_some(resources.max_table_elements),
            cpu_request: set(resources.cpu_request_millicores),
            cpu_limit: set(resources.cpu_limit_millicores),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_cross_the_wire_with_zero_for_unset() {
        let limits = SandboxLimits {
            memory: Some(16 << 20),
            memory_request: None,
            cpu_time: Some(Duration::from_millis(1500)),
            deadline: Some(Duration::from_secs(5)),
            logs: Some(4096),
            table_elements: None,
            cpu_request: Some(250),
            cpu_limit: None,
        };
        let wire = Resources::from(&limits);
        assert_eq!(
            wire,
            Resources {
                memory_limit_bytes: 16 << 20,
                memory_request_bytes: 0,
                cpu_limit_ms: 1500,
                deadline_ms: 5000,
                log_limit_bytes: 4096,
                max_table_elements: 0,
                cpu_request_millicores: 250,
                cpu_limit_millicores: 0,
            }
        );
        assert_eq!(SandboxLimits::from(&wire), limits);
        assert_eq!(
            SandboxLimits::from(&Resources::default()),
            SandboxLimits::default()
        );
    }
}
