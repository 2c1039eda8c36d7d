//! Inbound: connections that arrive at a meshed pod of this node. HBONE tunnels from other
//! node proxies are served by the pod's HBONE listener (`hbone`); a connection from another
//! meshed pod of this node is handed over in process by the outbound side, found through
//! `local`; plaintext from outside the mesh is handed by the kernel to its plaintext listener
//! (`plaintext`). A meshed client is admitted (`admission`) by the pod's
//! AuthorizationPolicies, plaintext by the namespace's mode and the policies; either is
//! parsed as HTTP where a policy looks at requests (`authorize`, on normalised paths from
//! `path`), decided again when the policies change (`revocation`), and delivered to the
//! application from inside the pod (`delivery`). What they share, the node's context and
//! the pod, is in `context`.

pub mod admission;
pub mod authorize;
pub mod context;
pub mod delivery;
pub mod hbone;
pub mod local;
pub mod path;
pub mod plaintext;
pub mod revocation;
