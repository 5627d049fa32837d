//! [`Operations`]: applying and stopping the control plane's workloads off the session loop.
//!
//! Preparing a workload can take as long as its module takes to compile. Done in the session
//! loop, one tenant's costly module would hold up the node's heartbeats (the control plane then
//! marks the node NotReady and moves every replica away) and every other workload's changes.
//! Here each workload's operations run in a task of their own, one at a time per workload in the
//! order they came, and a newer operation replaces one still waiting: a workload whose spec
//! changes twice while it compiles is applied once more, with the latest spec, and a workload
//! removed meanwhile is stopped after its apply ends, never left running.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use flotilla_proto::agent::v1::WorkloadSpec;
use flotilla_proto::control::v1::SandboxEvent;

use crate::supervisor::Supervisor;

/// What to do with one workload.
pub(super) enum Operation {
    /// Apply this spec; failures are reported for the control-plane `key`.
    Apply {
        /// The control-plane workload key.
        key: String,
        /// The spec, with its module inline.
        spec: Box<WorkloadSpec>,
    },
    /// Stop every sandbox of the workload and forget it.
    Stop,
}

/// Per-workload operations in flight, and the failures to report. Cheap to clone.
#[derive(Clone, Default)]
pub(super) struct Operations {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Workloads with a task running, and the operation each has waiting, if any.
    queued: Mutex<HashMap<String, Option<Operation>>>,
    /// Applies that failed since the last heartbeat took them.
    failed: Mutex<Vec<SandboxEvent>>,
}

impl Operations {
    /// Runs `operation` on the workload `name`: now in a task of its own if none is running for
    /// it, else after the running one, replacing any operation still waiting.
    pub(super) fn submit(&self, supervisor: &Supervisor, name: String, operation: Operation) {
        {
            let mut queued = lock(&self.inner.queued);
            if let Some(waiting) = queued.get_mut(&name) {
                *waiting = Some(operation);
                return;
            }
            queued.insert(name.clone(), None);
        }
        let operations = self.clone();
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            let mut next = Some(operation);
            while let Some(operation) = next {
                operations.run(&supervisor, &name, operation).await;
                let mut queued = lock(&operations.inner.queued);
                next = queued.get_mut(&name).and_then(Option::take);
                if next.is_none() {
                    queued.remove(&name);
                }
            }
        });
    }

    /// The failures since the last call.
    pub(super) fn take_failures(&self) -> Vec<SandboxEvent> {
        std::mem::take(&mut *lock(&self.inner.failed))
    }

    async fn run(&self, supervisor: &Supervisor, name: &str, operation: Operation) {
        match operation {
            Operation::Apply { key, spec } => {
                let generation = spec.generation;
                if let Err(error) = supervisor.apply(*spec).await {
                    let message = flotilla_telemetry::error_chain(&error).to_string();
                    tracing::warn!(workload = %key, error = %message, "desired workload not applied");
                    lock(&self.inner.failed).push(super::event(
                        &key,
                        generation,
                        error.reason(),
                        message,
                    ));
                }
            }
            Operation::Stop => {
                supervisor.stop(name, None).await;
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
