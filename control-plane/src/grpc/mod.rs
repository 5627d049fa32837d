//! The control plane's gRPC services. Only `flotilla-proto` types cross this boundary;
//! conversions to and from the model live in [`convert`].

pub mod agents;
pub mod convert;
pub mod server;

pub use self::agents::AgentService;
pub use self::server::WorkloadService;

#[cfg(test)]
mod agents_tests;
#[cfg(test)]
mod tests;
