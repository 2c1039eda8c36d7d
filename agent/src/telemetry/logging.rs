//! tracing set-up: `RUST_LOG` filters (default `info`); `NODEMESH_LOG_FORMAT=json` for JSON.
//! Access logs (target `nodemesh::access`) always go to stdout as JSON lines, one object
//! per line, whatever the format of the other logs, which go to stderr.

use tracing_subscriber::{
    EnvFilter, Layer, filter::filter_fn, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

use super::access;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("NODEMESH_LOG_FORMAT").is_ok_and(|f| f == "json");
    let not_access = filter_fn(|meta| meta.target() != access::TARGET);
    let logs = if json {
        fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(not_access)
            .boxed()
    } else {
        fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .with_filter(not_access)
            .boxed()
    };
    let access_logs = fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stdout)
        .with_filter(filter_fn(|meta| meta.target() == access::TARGET));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(access_logs)
        .init();
}
