//! The content-addressed module store: wasm blobs pushed by `flotilla apply` or fetched from
//! `spec.module.url`, kept on disk under their SHA-256 and served to agents by digest.

mod fetch;
pub mod oci;
mod store;
mod url;

pub use self::fetch::{DEFAULT_FETCH_TIMEOUT, FetchError, ModuleFetcher};
pub use self::store::{DEFAULT_MAX_MODULE_BYTES, ModuleError, ModuleStore};
pub use self::url::{UrlModuleError, UrlModules};
