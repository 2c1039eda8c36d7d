//! tracing set-up: `RUST_LOG` filters (default `info`); the agent's own logs go to stderr as
//! JSON lines or as text (`--log-format`; JSON unless stderr is a terminal, since cluster log
//! pipelines expect JSON), with colours only on a terminal. Access logs are not `tracing`
//! events: `access` writes them to stdout itself.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, Layer, fmt, layer::SubscriberExt, util::SubscriberInitExt};

/// How the logs on stderr are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

impl LogFormat {
    /// `requested`, or what suits stderr: text on a terminal, JSON otherwise.
    pub fn or_default_for_stderr(requested: Option<LogFormat>) -> LogFormat {
        requested.unwrap_or(if std::io::stderr().is_terminal() {
            LogFormat::Text
        } else {
            LogFormat::Json
        })
    }
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => fmt::layer()
            .with_target(false)
            .with_ansi(colours_on_stderr())
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .init();
}

/// Colour escapes only for a person at a terminal who has not asked for none (`NO_COLOR`).
fn colours_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
