//! The one place Flotilla's binaries install a tracing subscriber, the one way they print an
//! error with its causes, the one Prometheus `/metrics` endpoint they serve, and the one way
//! they wait for SIGTERM.
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

/// Serves `GET /metrics` on `listener`, answering with `encode()` in the OpenMetrics text
/// format, until `shutdown` completes. Failures are logged.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    encode: impl Fn() -> String + Clone + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let encode = encode.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    encode(),
                )
            }
        }),
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "metrics endpoint stopped");
    }
}

/// Installs SIGTERM and SIGINT handlers now (so a signal during startup is not lost); the
/// future completes on the first of them. Every Flotilla process stops gracefully on it.
///
/// # Errors
/// The handlers cannot be installed.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
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
