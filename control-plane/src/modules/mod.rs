//! The content-addressed module store: wasm blobs pushed by `flotilla apply` or fetched from
//! `spec.module.url`, kept on disk under their SHA-256 and served to agents by digest.

mod fetch;
mod guard;
pub(crate) mod oci;
mod store;
mod url;

pub use self::guard::{DeniedAddress, FetchGuard};
pub(crate) use self::store::DEFAULT_MAX_MODULE_BYTES;
pub use self::store::{ModuleError, ModuleStore};
pub(crate) use self::url::{UrlModuleError, UrlModules};
