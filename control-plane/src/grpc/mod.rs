//! The control plane's gRPC services. Only `flotilla-proto` types cross this boundary;
//! conversions to and from the model live in [`convert`].

pub(crate) mod agents;
mod chunks;
pub(crate) mod convert;
mod reports;
pub(crate) mod server;

pub use self::agents::AgentService;

/// Largest gRPC message the control plane takes or sends: a module of the module store's
/// default limit plus room for the envelope (tonic's own default is 4 MiB).
pub(crate) const MAX_MODULE_MESSAGE_BYTES: usize =
    crate::modules::DEFAULT_MAX_MODULE_BYTES as usize + (1 << 20);
pub use self::server::WorkloadService;

#[cfg(test)]
mod agents_tests;
#[cfg(test)]
mod tests;
