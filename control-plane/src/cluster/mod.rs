//! What the control plane knows about its node agents, shared by the agent protocol, the user
//! API and the controller: the [`NodeRegistry`], the live [`Sessions`] (which also relay logs)
//! and the [`EventLog`] of sandbox failures, the [`DesiredIndex`] of what each node should run,
//! the HTTP [`RouteTable`], the [`ConfigSet`] of ConfigMaps and Secrets, with the control
//! plane's [`Metrics`].

pub(crate) mod config;
pub(crate) mod desired;
pub(crate) mod events;
pub(crate) mod identity;
pub(crate) mod nodes;
pub(crate) mod routes;
pub(crate) mod sessions;

pub(crate) use self::config::{ConfigKey, ConfigSet};
pub use self::desired::DesiredIndex;
pub(crate) use self::events::{Event, EventLog, Notice};
pub(crate) use self::identity::NodeIdentities;
pub(crate) use self::nodes::{Counts, ListedNode, NodeRegistry, Reported};
pub(crate) use self::routes::RouteTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) use self::sessions::Sessions;
use crate::metrics::Metrics;

/// The live cluster, in memory. Agents rebuild it by reconnecting after a restart.
pub struct Cluster {
    /// Registered nodes, their readiness and what they run.
    pub nodes: NodeRegistry,
    /// Which credential may register each node name.
    pub identities: std::sync::Arc<NodeIdentities>,
    /// Open agent sessions and log requests in flight.
    pub sessions: Sessions,
    /// Recent sandbox failures.
    pub events: EventLog,
    /// What each node should run, fed by [`DesiredIndex::run`].
    pub desired: DesiredIndex,
    /// Which node ingresses serve each HTTP workload.
    pub routes: RouteTable,
    /// The ConfigMaps and Secrets workloads may refer to.
    pub config: ConfigSet,
    /// Counters and gauges served at `/metrics`.
    pub metrics: Metrics,
    /// Every task the control plane spawns, drained on shutdown.
    pub tasks: TaskTracker,
    /// Cancelled when the control plane shuts down: long-lived tasks end on it.
    pub shutdown: CancellationToken,
}

impl Default for Cluster {
    fn default() -> Self {
        let tasks = TaskTracker::new();
        Self {
            nodes: NodeRegistry::default(),
            identities: std::sync::Arc::default(),
            sessions: Sessions::new(tasks.clone()),
            events: EventLog::default(),
            desired: DesiredIndex::default(),
            routes: RouteTable::default(),
            config: ConfigSet::default(),
            metrics: Metrics::default(),
            tasks,
            shutdown: CancellationToken::new(),
        }
    }
}

// === impl Cluster ===

impl Cluster {
    /// The control plane's metrics in Prometheus text format, with the gauges of nodes and
    /// sessions read now.
    pub fn encode_metrics(&self) -> String {
        let statuses = self.nodes.statuses();
        let ready = statuses.iter().filter(|s| s.info.ready).count();
        self.metrics
            .encode(ready, statuses.len() - ready, self.sessions.live_count())
    }
}
