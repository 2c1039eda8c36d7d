//! Status write-back: the `status.parents` entries nodemesh reports for each route under its
//! controller name, computed from the spec as written (leniently, so that a route that does
//! not convert is reported too).

use std::collections::BTreeMap;

use super::{convert::RouteError, table::route_key};
use crate::k8s::objects::{RouteKind, RouteObject, RouteStatusUpdate};

/// The controller name nodemesh reports route status under.
pub const CONTROLLER_NAME: &str = "nodemesh.io/mesh";

/// The status each route should carry for its Service parents (Accepted, ResolvedRefs), for
/// the routes whose current status says something else. `errors` are this rebuild's
/// conversion errors; `service_exists` says whether `namespace/name` is a Service.
pub fn status_updates<K: RouteKind>(
    routes: &BTreeMap<(String, String), RouteObject<K>>,
    errors: &[RouteError],
    service_exists: impl Fn(&str) -> bool,
    now: &str,
) -> Vec<RouteStatusUpdate> {
    let mut updates = Vec::new();
    for ((namespace, name), object) in routes {
        let key = route_key::<K>(namespace, name);
        let error = errors.iter().find(|e| e.route == key);
        let parents = service_parents(&object.spec);
        if parents.is_empty() {
            continue;
        }
        let (accepted, accepted_reason, accepted_message) = match error {
            Some(error) => (
                "False",
                "UnsupportedValue",
                format!(
                    "{}: {}; the last accepted version of this route keeps serving",
                    error.field, error.message
                ),
            ),
            None => ("True", "Accepted", "accepted by nodemesh".to_owned()),
        };
        let missing: Vec<String> = backend_services(&object.spec, namespace)
            .into_iter()
            .filter(|service| !service_exists(service))
            .collect();
        let (resolved, resolved_reason, resolved_message) = if missing.is_empty() {
            ("True", "ResolvedRefs", "all backends resolved".to_owned())
        } else {
            (
                "False",
                "BackendNotFound",
                format!("no such Service: {}", missing.join(", ")),
            )
        };
        let generation = object.metadata.generation;
        let condition = |kind: &str, status: &str, reason: &str, message: &str| {
            serde_json::json!({
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now,
            })
        };
        let ours: Vec<serde_json::Value> = parents
            .into_iter()
            .map(|parent_ref| {
                serde_json::json!({
                    "parentRef": parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": [
                        condition("Accepted", accepted, accepted_reason, &accepted_message),
                        condition("ResolvedRefs", resolved, resolved_reason, &resolved_message),
                    ],
                })
            })
            .collect();
        let current: Vec<serde_json::Value> = object
            .status
            .as_ref()
            .and_then(|s| s.get("parents"))
            .and_then(|p| p.as_array())
            .cloned()
            .unwrap_or_default();
        let current_ours: Vec<&serde_json::Value> = current
            .iter()
            .filter(|p| p["controllerName"] == CONTROLLER_NAME)
            .collect();
        let unchanged = current_ours.len() == ours.len()
            && current_ours
                .iter()
                .zip(&ours)
                .all(|(a, b)| same_ignoring_time(a, b));
        if unchanged {
            continue;
        }
        let mut parents: Vec<serde_json::Value> = current
            .into_iter()
            .filter(|p| p["controllerName"] != CONTROLLER_NAME)
            .collect();
        parents.extend(ours);
        updates.push(RouteStatusUpdate {
            kind: K::KIND,
            namespace: namespace.clone(),
            name: name.clone(),
            resource_version: object.metadata.resource_version.clone(),
            parents,
        });
    }
    updates
}

/// Equal once every `lastTransitionTime` is left out.
fn same_ignoring_time(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    fn strip(value: &serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => map
                .iter()
                .filter(|(k, _)| *k != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), strip(v)))
                .collect(),
            serde_json::Value::Array(items) => items.iter().map(strip).collect(),
            other => other.clone(),
        }
    }
    strip(a) == strip(b)
}

/// The route's Service parentRefs as written (read leniently: status must be reported for
/// routes whose spec does not convert, too).
fn service_parents(spec: &serde_json::Value) -> Vec<serde_json::Value> {
    spec["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["kind"] == "Service" && p["group"].as_str().unwrap_or("").is_empty())
        .cloned()
        .collect()
}

/// `namespace/name` of every Service the route's rules send to.
fn backend_services(spec: &serde_json::Value, namespace: &str) -> Vec<String> {
    let mut services: Vec<String> = spec["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["backendRefs"].as_array().into_iter().flatten())
        .filter(|b| b["kind"].as_str().unwrap_or("Service") == "Service")
        .filter_map(|b| {
            let name = b["name"].as_str()?;
            let ns = b["namespace"].as_str().unwrap_or(namespace);
            Some(format!("{ns}/{name}"))
        })
        .collect();
    services.sort();
    services.dedup();
    services
}
