//! The outcome of a plugin for one node, as in kube-scheduler.

/// What a filter or pre-filter says about a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// The node fits.
    Success,
    /// The node does not fit now, but could after other replicas move (e.g. resources).
    Unschedulable(String),
    /// The node cannot fit whatever happens (e.g. a selector mismatch).
    UnschedulableAndUnresolvable(String),
    /// The plugin failed; the cycle is aborted.
    Error(String),
    /// The plugin has nothing to say for this workload.
    Skip,
}

impl Status {
    /// Whether the node passes (success or skip).
    pub fn is_success(&self) -> bool {
        matches!(self, Status::Success | Status::Skip)
    }

    /// The reason a node was rejected, if it was.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Status::Unschedulable(r)
            | Status::UnschedulableAndUnresolvable(r)
            | Status::Error(r) => Some(r),
            Status::Success | Status::Skip => None,
        }
    }
}
