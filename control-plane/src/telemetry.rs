//! The one place the control plane installs a tracing subscriber.
//!
//! `FLOTILLA_LOG` is an `EnvFilter` directive (default `warn,flotilla=info`);
//! `FLOTILLA_LOG_FORMAT` is `plain` (default) or `json`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Does nothing if one is already installed.
pub fn init() {
    let filter = EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| EnvFilter::new("warn,flotilla=info,flotilla_control_plane=info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match std::env::var("FLOTILLA_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().try_init(),
        _ => builder.try_init(),
    };
    // Already installed (tests, embedding): keep the existing one.
    drop(result);
}
