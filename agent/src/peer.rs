//! Who is at either end of a connection or request, as the mesh names them: the workload,
//! its namespace and its SPIFFE identity. The proxy fills these in, the cluster state
//! (`state::workloads`) resolves them, and telemetry labels its metrics, logs and spans
//! with them.

/// What a peer outside the cluster's knowledge is called.
pub const UNKNOWN: &str = "unknown";

/// Who is at one end of a connection or request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    /// SPIFFE ID, or `unknown`.
    pub principal: String,
}

impl Peer {
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
        }
    }
}

/// Which end's proxy reports: the client's node (`source`) or the destination's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

/// What one connection or request is, for its labels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Traffic {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    /// `name.namespace.svc.cluster.local`, or `unknown`.
    pub destination_service: String,
    /// Mutual TLS (HBONE) or not.
    pub mutual_tls: bool,
}

/// The zones at either end of a request or connection to a Service endpoint, when this
/// node has a zone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ZonePair {
    pub source: std::sync::Arc<str>,
    /// None when the endpoint's slice gives no zone.
    pub destination: Option<std::sync::Arc<str>>,
}
