//! Gateway API HTTPRoutes and GRPCRoutes attached to Services (GAMMA): what the L7 proxy
//! does with each HTTP request (gRPC call) addressed to a Service. A GRPCRoute is translated
//! into an HTTPRoute's form first (`grpc.rs`) and applied by the same table.
//!
//! A route applies to a Service when one of its `parentRefs` names it (`kind: Service`,
//! group `""`), optionally on one port. Routes in the Service's namespace (producer routes)
//! apply to every client; routes in another namespace (consumer routes) apply only to clients
//! in that namespace, and replace the producer routes for them. Requests are matched against
//! every rule of every applicable route in Gateway API precedence order: exact path before
//! prefix, longer prefix first, then method, more header matches, more query matches, then
//! the older route, then `namespace/name`, then rule order. A Service with routes where no
//! rule matches answers 404; a Service without routes forwards to itself.
//!
//! Conversion is strict: an invalid route (a bad regex, a backend in another namespace, a
//! malformed duration, an unknown filter) is reported with the field that is wrong, and the
//! last version of that route that converted keeps serving.
//!
//! In cluster mode the outcome is written back to each route's `status.parents` under the
//! controller name `nodemesh.io/mesh`: `Accepted` (False with the error when the route does not
//! convert) and `ResolvedRefs` (False when a backend Service does not exist).
//!
//! `spec.rs` is the spec as written, `convert.rs` its conversion and validation into the
//! rules of `rule.rs`, `grpc.rs` a GRPCRoute's translation, `table.rs` the table in precedence order, `status.rs` the status
//! write-back.

mod convert;
mod grpc;
mod rule;
mod spec;
mod status;
mod table;

pub use convert::{InvalidDuration, RouteError, RouteKey, parse_duration};
pub use rule::{
    Backend, HeaderModifier, PathMatch, PathModifier, Redirect, RequestMatch, RequestView, Retry,
    Rule, UrlRewrite, ValueMatch,
};
pub use status::{CONTROLLER_NAME, status_updates};
pub use table::{RouteDecision, RouteTable, RouteView};

/// `namespace/name` of a Service.
pub type ServiceName = String;

#[cfg(test)]
mod grpc_tests;
#[cfg(test)]
mod tests;
