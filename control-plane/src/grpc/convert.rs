//! Model ↔ wire conversions and error mapping for the user API.

use flotilla_model::module::ModuleCheckError;
use flotilla_proto::control::v1::WorkloadObject;
use serde::Deserialize;
use tonic::Status;

use crate::model::{FieldError, ValidationError, Workload};
use crate::modules::{ModuleError, UrlModuleError};
use crate::store;

/// Parses one object from JSON or YAML bytes (YAML is a superset of JSON).
///
/// # Errors
/// A [`ValidationError`] naming the position or field that is wrong.
pub(crate) fn parse_manifest(bytes: &[u8]) -> Result<Workload, ValidationError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ValidationError(vec![FieldError {
            field: "manifest".into(),
            message: format!("not UTF-8: {e}"),
        }])
    })?;
    let mut docs = serde_yaml::Deserializer::from_str(text);
    let doc = docs.next().ok_or_else(|| {
        ValidationError(vec![FieldError {
            field: "manifest".into(),
            message: "empty".into(),
        }])
    })?;
    Workload::deserialize(doc).map_err(|e| {
        ValidationError(vec![FieldError {
            field: e.location().map_or("manifest".into(), |l| {
                format!("line {} column {}", l.line(), l.column())
            }),
            message: e.to_string(),
        }])
    })
}

/// Encodes an object for the wire.
pub(crate) fn to_object(workload: &Workload) -> Result<WorkloadObject, Status> {
    serde_json::to_vec(workload)
        .map(|json| WorkloadObject { json })
        .map_err(|e| Status::internal(format!("encoding workload: {e}")))
}

/// Maps store errors to gRPC codes a client can act on.
pub(crate) fn store_status(error: store::Error) -> Status {
    let message = flotilla_telemetry::error_chain(&error);
    match error {
        store::Error::Invalid(_) => Status::invalid_argument(message),
        store::Error::Conflict { .. } => Status::aborted(message),
        store::Error::NotFound(_) => Status::not_found(message),
        store::Error::Decode { .. } => Status::internal(message),
        // The control plane writes with its own credentials, already checked against the
        // caller's rights: a refusal means its own RBAC is short.
        store::Error::Kube(::kube::Error::Api(ref status)) if status.code == 403 => {
            Status::failed_precondition(format!(
                "the control plane's own Kubernetes credentials were refused (is the chart's \
                 RBAC installed?): {message}"
            ))
        }
        store::Error::Kube(::kube::Error::Api(ref status)) if status.code == 422 => {
            Status::invalid_argument(message)
        }
        store::Error::Open(_)
        | store::Error::Read(_)
        | store::Error::Write(_)
        | store::Error::Task(_)
        | store::Error::Kube(_)
        | store::Error::Unavailable(_) => Status::unavailable(message),
    }
}

/// Maps module store errors to gRPC codes.
pub(crate) fn module_status(error: ModuleError) -> Status {
    let message = flotilla_telemetry::error_chain(&error);
    match error {
        ModuleError::Refused(ModuleCheckError::TooLarge { .. }) => {
            Status::resource_exhausted(message)
        }
        ModuleError::Refused(_) | ModuleError::Invalid(_) => Status::invalid_argument(message),
        ModuleError::NotFound(_) => Status::not_found(message),
        ModuleError::Io { .. } => Status::unavailable(message),
    }
}

/// Maps a failed `spec.module.url` download: the module or its server is not as the manifest
/// says, a precondition of the apply.
pub(crate) fn url_module_status(error: UrlModuleError) -> Status {
    Status::failed_precondition(flotilla_telemetry::error_chain(&error))
}
