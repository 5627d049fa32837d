//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's `leaderelection` does it.
//!
//! The holder renews `renewTime` every retry period. A candidate takes the Lease once it has
//! seen the same record, unchanged, for the lease duration, measured on its own clock, so
//! clock skew between replicas does not matter. Every write carries the `resourceVersion` it
//! read, so of two candidates at most one wins. A leader that cannot renew within the renew
//! deadline gives up: [`Leadership::lost`] completes and the process should stop serving.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use tokio::sync::watch;

use crate::store::kube::FIELD_MANAGER;

/// Where and how to campaign.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This candidate, unique among replicas (the pod name).
    pub identity: String,
    /// How long a Lease stays held without renewal (whole seconds, as the Lease stores it).
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it gives up.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Held leadership: renewed in the background until dropped or released.
pub struct Leadership {
    lost: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Completes when leadership is lost (renewals failed past the renew deadline).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Stops renewing and hands the Lease back, so another replica takes over at once.
    pub async fn release(mut self) {
        let _ = self.stop.send(true);
        let _ = (&mut self.renewer).await;
    }
}

impl Drop for Leadership {
    /// Stops renewing without handing the Lease back: it expires after its duration.
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// What a candidate last saw of the Lease, and when it saw it change.
struct Observed {
    holder: String,
    renew_time: Option<Timestamp>,
    at: Instant,
}

struct Candidate {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

/// Campaigns until this candidate holds the Lease, then renews it in the background. API
/// failures are logged and retried; it returns only once it wins.
pub async fn acquire(client: kube::Client, config: LeaseConfig) -> Leadership {
    let mut candidate = Candidate {
        api: Api::namespaced(client, &config.namespace),
        config,
        observed: None,
    };
    let mut logged_holder = String::new();
    loop {
        match candidate.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {
                let holder = candidate
                    .observed
                    .as_ref()
                    .map(|o| o.holder.clone())
                    .unwrap_or_default();
                if holder != logged_holder {
                    tracing::info!(lease = %candidate.config.name, %holder, "waiting for the leader's lease to expire");
                    logged_holder = holder;
                }
            }
            Err(error) => {
                tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "leader election failed; retrying");
            }
        }
        tokio::time::sleep(candidate.config.retry_period).await;
    }
    tracing::info!(lease = %candidate.config.name, identity = %candidate.config.identity, "became the leader");
    let (lost_tx, lost) = watch::channel(false);
    let (stop, mut stop_seen) = watch::channel(false);
    let renewer = tokio::spawn(async move {
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                // The one change is to `true`; a dropped sender means stop as well.
                _ = stop_seen.changed() => {
                    candidate.release().await;
                    return;
                }
                () = tokio::time::sleep(candidate.config.retry_period) => {}
            }
            match candidate.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => {
                    tracing::error!("another replica took the lease");
                    let _ = lost_tx.send(true);
                    return;
                }
                Err(error) => {
                    tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "renewing the lease failed");
                    if last_renewal.elapsed() >= candidate.config.renew_deadline {
                        tracing::error!(deadline = ?candidate.config.renew_deadline, "could not renew the lease in time; leadership lost");
                        let _ = lost_tx.send(true);
                        return;
                    }
                }
            }
        }
    });
    Leadership {
        lost,
        stop,
        renewer,
    }
}

impl Candidate {
    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let held_by_us = previous
            .and_then(|p| p.holder_identity.as_deref())
            .is_some_and(|h| h == self.config.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if held_by_us {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if held_by_us || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// One round: true if this candidate holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, now)),
            };
            return match self.api.create(&params, &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let renew_time = spec.renew_time.as_ref().map(|t| t.0);
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew_time != renew_time);
        if changed {
            self.observed = Some(Observed {
                holder: holder.clone(),
                renew_time,
                at: Instant::now(),
            });
        }
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.config.lease_duration, Duration::from_secs);
        let expired = self
            .observed
            .as_ref()
            .is_none_or(|o| o.at.elapsed() >= duration);
        if !holder.is_empty() && holder != self.config.identity && !expired {
            return Ok(false);
        }
        lease.spec = Some(self.spec(Some(&spec), now));
        match self.api.replace(&self.config.name, &params, &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Empties the holder so that the next candidate need not wait for expiry.
    async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.config.name, "released the lease"),
            Err(error) => {
                tracing::warn!(error = %flotilla_telemetry::error_chain(&error), "releasing the lease failed");
            }
        }
    }
}

#[cfg(test)]
mod tests;
