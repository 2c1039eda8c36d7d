//! The one error type of the testbed library.

use std::{io, path::PathBuf, time::Duration};

/// Everything that can go wrong while building, using or tearing down a testbed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// A file-system or process operation failed; `what` says which.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A system call made through nix failed; `what` says which.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: nix::Error,
    },
    /// An external command (`ip`, ...) exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A Kubernetes object could not be serialised.
    #[error("serialising {what}: {source}")]
    Yaml {
        /// Which object.
        what: String,
        /// The underlying error.
        source: serde_yaml::Error,
    },
    /// The topology asked for is not one the testbed can build.
    #[error("invalid topology: {0}")]
    Topology(String),
    /// No pod with this namespace and name exists in the testbed.
    #[error("no pod {namespace}/{name} in this testbed")]
    UnknownPod {
        /// The namespace asked for.
        namespace: String,
        /// The pod name asked for.
        name: String,
    },
    /// No node with this name exists in the testbed.
    #[error("no node {0} in this testbed")]
    UnknownNode(String),
    /// No namespace with this name exists in the testbed.
    #[error("no namespace {0} in this testbed")]
    UnknownNamespace(String),
    /// The agent of a node could not be started, did not become ready, or is not running.
    #[error("agent on {node}: {reason}\n--- last lines of {} ---\n{log_tail}", log.display())]
    Agent {
        /// The node.
        node: String,
        /// What went wrong.
        reason: String,
        /// The agent's log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },
    /// The admin API of a node's agent could not be reached or answered garbage.
    #[error("admin API of {node}, GET {path}: {reason}")]
    Admin {
        /// The node.
        node: String,
        /// The path requested.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A condition polled with `wait_until` did not hold in time.
    #[error("timed out after {timeout:?} waiting for {what}{}", last_error.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default())]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        timeout: Duration,
        /// The last error the condition returned, if any.
        last_error: Option<String>,
    },
    /// A binary the testbed needs was not found.
    #[error("{0}")]
    BinaryNotFound(String),
    /// A request to the API server failed; `what` says which.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: kube::Error,
    },
    /// A plain I/O error without more context (lets `?` work in `wait_until` conditions).
    #[error(transparent)]
    PlainIo(#[from] io::Error),
    /// Anything else, described in words.
    #[error("{0}")]
    Other(String),
}

/// The library's result type.
pub type Result<T, E = TestbedError> = std::result::Result<T, E>;

/// Attaches a description to io errors (`.io_context(|| "...")`).
pub(crate) trait IoContext<T> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| TestbedError::Io {
            what: what(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn io_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| TestbedError::Sys {
            what: what(),
            source,
        })
    }
}
