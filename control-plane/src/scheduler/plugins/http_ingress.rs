//! `HttpIngress`: replicas of an HTTP workload go only to nodes whose agent serves an ingress.

use crate::scheduler::cycle_state::CycleState;
use crate::scheduler::framework::{FilterPlugin, NodeView, Plugin, WorkloadRequest};
use crate::scheduler::status::Status;

/// The plugin's name.
pub const NAME: &str = "HttpIngress";

/// Filters out nodes without an HTTP ingress for HTTP workloads.
#[derive(Debug, Default)]
pub struct HttpIngress;

impl Plugin for HttpIngress {
    fn name(&self) -> &'static str {
        NAME
    }
}

impl FilterPlugin for HttpIngress {
    fn filter(&self, _: &CycleState, workload: &WorkloadRequest, node: &NodeView<'_>) -> Status {
        if !workload.http || !node.info.ingress_url.is_empty() {
            Status::Success
        } else {
            Status::UnschedulableAndUnresolvable("node(s) had no HTTP ingress".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::plugins::testing::*;

    #[test]
    fn http_workloads_need_an_ingress() {
        for (http, url, fits) in [
            (false, "", true),
            (true, "http://10.0.0.7:8080", true),
            (true, "", false),
        ] {
            let mut info = node("n");
            info.ingress_url = url.into();
            let mut request = workload(0, 0);
            request.http = http;
            let status = HttpIngress.filter(&CycleState::default(), &request, &view(&info));
            assert_eq!(status.is_success(), fits, "http {http}, ingress {url:?}");
        }
    }
}
