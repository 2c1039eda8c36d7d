//! Inbound: connections that arrive at a meshed pod of this node. HBONE tunnels from other
//! node proxies are served by the pod's HBONE listener (`hbone`); plaintext from outside the
//! mesh is handed by the kernel to its plaintext listener (`plaintext`). Either is decided by
//! the namespace's mode and the pod's AuthorizationPolicies, parsed as HTTP where a policy
//! looks at requests (`authorize`, on normalised paths from `path`), decided again when the
//! policies change (`revocation`), and delivered to the application from inside the pod
//! (`delivery`). What they share, the node's context and the pod, is in `context`.

pub mod authorize;
pub mod context;
pub mod delivery;
pub mod hbone;
pub mod path;
pub mod plaintext;
pub mod revocation;
