//! The one place Flotilla's binaries install a tracing subscriber, and the one way they print an
//! error with its causes.
//!
//! `FLOTILLA_LOG` is an `EnvFilter` directive (default `warn,flotilla=info` plus the binary's own
//! crate at `info`); `FLOTILLA_LOG_FORMAT` is `plain` (default) or `json`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `crate_name` (e.g. `flotilla_node_agent`) logs at `info` by
/// default. Does nothing if a subscriber is already installed (tests, embedding).
pub fn init(crate_name: &str) {
    let filter = EnvFilter::try_from_env("FLOTILLA_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,flotilla=info,{crate_name}=info")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match std::env::var("FLOTILLA_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().try_init(),
        _ => builder.try_init(),
    };
    // Already installed: keep the existing one.
    drop(result);
}

/// Formats an error with its chain of causes on one line: `outer: inner: root`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_every_cause() {
        let outer = Wrapped(std::io::Error::other("disk on fire"));
        assert_eq!(error_chain(&outer), "reading config: disk on fire");
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("reading config")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
