//! `nodemesh status`: what the agent on this node is doing, from its admin API.

use std::{fmt::Write, net::SocketAddr};

use serde_json::Value;

use super::admin_client::{AdminClient, AdminError};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("/config_dump is not the JSON this nodemesh understands: {0}")]
    Dump(serde_json::Error),
}

/// The status report, as printed.
pub fn report(admin: SocketAddr, now_unix: u64) -> Result<String, StatusError> {
    let client = AdminClient::new(admin)?;
    let ready = client.get("/readyz")?.status == hyper::StatusCode::OK;
    let body = client.get_ok("/config_dump")?;
    let dump: Value = serde_json::from_str(&body).map_err(StatusError::Dump)?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}: {} (fail mode {}, programs at {})",
        dump["node"].as_str().unwrap_or("?"),
        if ready { "ready" } else { "NOT READY" },
        dump["fail_mode"].as_str().unwrap_or("?"),
        dump["attach_point"].as_str().unwrap_or("?"),
    );
    cluster_state(&mut out, &dump["cluster_state"]);
    enrolled_pods(&mut out, &dump);
    pending_pods(&mut out, &dump);
    identities(&mut out, &dump, now_unix);
    config_counts(&mut out, &dump);
    config_errors(&mut out, &dump);
    zones(&mut out, &dump);
    Ok(out)
}

/// The pods this node's agent meshes: addresses, peer authentication, cgroup, identity.
fn enrolled_pods(out: &mut String, dump: &Value) {
    let pods = dump["enrolled_pods"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(out, "\nENROLLED PODS ({})", pods.len());
    let _ = writeln!(
        out,
        "  {:<32} {:<28} {:<11} {:<10} {:<4} IDENTITY",
        "POD", "ADDRESSES", "PEER AUTH", "CGROUP", "DNS"
    );
    for pod in &pods {
        let ips: Vec<&str> = pod["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let _ = writeln!(
            out,
            "  {:<32} {:<28} {:<11} {:<10} {:<4} sa/{}",
            pod_name(pod),
            ips.join(","),
            pod["peer_authentication"].as_str().unwrap_or("?"),
            pod["cgroup_id"],
            if pod["dns_capture"] == true {
                "yes"
            } else {
                "no"
            },
            pod["service_account"].as_str().unwrap_or("?"),
        );
    }
}

/// The pods not enrolled yet, why, and what holds them meanwhile (nothing when none).
fn pending_pods(out: &mut String, dump: &Value) {
    let pending = dump["pending_pods"].as_array().cloned().unwrap_or_default();
    if pending.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nPENDING PODS ({})", pending.len());
    for pod in &pending {
        let _ = writeln!(
            out,
            "  {:<32} {}\n  {:<32} held: {}",
            pod_name(pod),
            pod["reason"].as_str().unwrap_or("?"),
            "",
            held(pod, dump["fail_mode"].as_str().unwrap_or("?")),
        );
    }
}

/// Each identity's certificate: when it expires and renews, and its last error.
fn identities(out: &mut String, dump: &Value, now_unix: u64) {
    let Some(identities) = dump["identities"].as_array() else {
        let _ = writeln!(out, "\nIDENTITIES: none (the agent runs without a CA)");
        return;
    };
    let _ = writeln!(out, "\nIDENTITIES ({})", identities.len());
    for identity in identities {
        let expiry =
            identity["not_after_unix"]
                .as_u64()
                .map_or("no certificate yet".to_owned(), |at| {
                    if at > now_unix {
                        format!("expires in {}", human(at - now_unix))
                    } else {
                        format!("EXPIRED {} ago", human(now_unix - at))
                    }
                });
        let renewal = identity["renew_at_unix"]
            .as_u64()
            .filter(|at| *at > now_unix)
            .map(|at| format!(", renews in {}", human(at - now_unix)))
            .unwrap_or_default();
        let error = identity["last_error"]
            .as_str()
            .map(|e| format!("  last error: {e}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<56} {expiry}{renewal}{error}",
            identity["spiffe_id"].as_str().unwrap_or("?")
        );
    }
}

/// How many Services, routes, policies and L7 endpoints (ejected ones too) are in use.
fn config_counts(out: &mut String, dump: &Value) {
    let count = |key: &str| dump[key].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        out,
        "\nSERVICES {}   ROUTES {}   AUTHORIZATION POLICIES {}   L7 ENDPOINTS {} ({} ejected)",
        count("services"),
        count("routes"),
        count("authorization_policies"),
        count("http_endpoints"),
        dump["http_endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["ejected"] == true)
            .count(),
    );
}

/// Service ports listed under ZONES at most.
const ZONE_LINES: usize = 20;

/// This node's zone and the Service ports whose traffic leaves their preferred endpoints
/// now: spilling under load, or failing over because none is ready (nothing without a zone).
fn zones(out: &mut String, dump: &Value) {
    let Some(zone) = dump["zones"]["local_zone"].as_str() else {
        return;
    };
    let services = dump["services"].as_array().cloned().unwrap_or_default();
    let preferring = services
        .iter()
        .filter(|s| s["zone_preference"].is_object())
        .count();
    let leaving: Vec<&Value> = services
        .iter()
        .filter(|s| s["spilling"] == true || s["zone_preference"]["count"] == 0)
        .collect();
    let _ = writeln!(
        out,
        "\nZONE {zone}: {preferring} of {} Service ports prefer endpoints here; {} send traffic beyond them now",
        services.len(),
        leaving.len(),
    );
    if leaving.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "  {:<40} {:<22} {:<10} {:<9} WHY",
        "SERVICE", "ADDRESS", "BY", "AFFINITY"
    );
    for service in leaving.iter().take(ZONE_LINES) {
        let preference = &service["zone_preference"];
        let why = if preference["count"] == 0 {
            "no ready endpoint preferred here: failing over".to_owned()
        } else {
            let policy = &service["zone_policy"];
            format!(
                "spilling: over {} requests in flight per preferred endpoint (back at {})",
                policy["spill_at"], policy["recover_at"]
            )
        };
        let _ = writeln!(
            out,
            "  {:<40} {:<22} {:<10} {:<9} {why}",
            service["service"].as_str().unwrap_or("?"),
            service["virtual_address"].as_str().unwrap_or("?"),
            preference["by"].as_str().unwrap_or("?"),
            service["zone_policy"]["affinity"].as_str().unwrap_or("?"),
        );
    }
    if leaving.len() > ZONE_LINES {
        let _ = writeln!(out, "  … and {} more", leaving.len() - ZONE_LINES);
    }
}

/// The configuration the agent refused (it keeps the last good version of each).
fn config_errors(out: &mut String, dump: &Value) {
    let errors = dump["config_errors"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if errors.is_empty() {
        let _ = writeln!(out, "CONFIG ERRORS none");
        return;
    }
    let _ = writeln!(
        out,
        "CONFIG ERRORS ({}; the last good version of each is in use)",
        errors.len()
    );
    for error in &errors {
        let _ = writeln!(out, "  {}", error.as_str().unwrap_or("?"));
    }
}

/// Where the cluster state comes from, watch by watch (why one is retrying or disabled).
fn cluster_state(out: &mut String, state: &Value) {
    let number = |key: &str| state[key].as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "\nCLUSTER STATE: {} pods indexed, {} services ({} virtual ports, {} ready endpoints)",
        number("pods_indexed"),
        number("services"),
        number("virtual_ports"),
        number("ready_endpoints"),
    );
    let _ = writeln!(
        out,
        "  {:<22} {:<9} {:<10} DETAIL",
        "WATCH", "STATE", "LIST"
    );
    for watch in state["watches"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<22} {:<9} {:<10} {}",
            watch["watch"].as_str().unwrap_or("?"),
            watch["state"].as_str().unwrap_or("?"),
            watch["initial_list"].as_str().unwrap_or("-"),
            watch["detail"]
                .as_str()
                .unwrap_or(watch["resource"].as_str().unwrap_or("")),
        );
    }
}

/// 3h12m, 4m05s, 9s.
pub fn human(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `namespace/name` of a pod in the config dump.
fn pod_name(pod: &Value) -> String {
    format!(
        "{}/{}",
        pod["namespace"].as_str().unwrap_or("?"),
        pod["name"].as_str().unwrap_or("?")
    )
}

/// What keeps a pending pod closed meanwhile: its connects, and plaintext sent to it.
fn held(pod: &Value, fail_mode: &str) -> String {
    let outbound = match (pod["cgroup_id"].is_u64(), fail_mode) {
        (false, _) => "no cgroup yet",
        (true, "closed") => "connects refused (fail mode closed)",
        (true, _) => "connects go direct (fail mode open)",
    };
    let inbound = match (
        pod["inbound_held"].as_bool(),
        pod["peer_authentication"].as_str(),
    ) {
        (Some(true), Some("STRICT")) => "plaintext dropped (STRICT)",
        (Some(true), _) => "plaintext reaches the pod directly (PERMISSIVE)",
        _ => "no inbound capture",
    };
    format!("{outbound}; {inbound}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_pod_says_what_holds_it_closed() {
        let pod = serde_json::json!({
            "cgroup_id": 4242, "inbound_held": true, "peer_authentication": "STRICT"
        });
        assert_eq!(
            held(&pod, "closed"),
            "connects refused (fail mode closed); plaintext dropped (STRICT)"
        );
        let unknown = serde_json::json!({
            "cgroup_id": null, "inbound_held": false, "peer_authentication": "PERMISSIVE"
        });
        assert_eq!(held(&unknown, "open"), "no cgroup yet; no inbound capture");
    }

    #[test]
    fn zones_name_the_service_ports_leaving_their_zone_and_why() {
        let dump = serde_json::json!({
            "zones": {"local_zone": "zone-a", "spilling": ["shop/web:80"]},
            "services": [
                {"service": "shop/web", "virtual_address": "10.96.0.10:80", "spilling": true,
                 "zone_preference": {"by": "zone", "count": 1},
                 "zone_policy": {"affinity": "load", "spill_at": 4.0, "recover_at": 2.0}},
                {"service": "shop/db", "virtual_address": "10.96.0.11:5432", "spilling": false,
                 "zone_preference": {"by": "zone_hints", "count": 0},
                 "zone_policy": {"affinity": "strict", "spill_at": 4.0, "recover_at": 2.0}},
                {"service": "shop/calm", "virtual_address": "10.96.0.12:80", "spilling": false,
                 "zone_preference": {"by": "zone", "count": 2},
                 "zone_policy": {"affinity": "load", "spill_at": 4.0, "recover_at": 2.0}},
                {"service": "shop/flat", "virtual_address": "10.96.0.13:80", "spilling": false,
                 "zone_policy": {"affinity": "off", "spill_at": 4.0, "recover_at": 2.0}},
            ],
        });
        let mut out = String::new();
        zones(&mut out, &dump);
        let lines: Vec<&str> = out.lines().map(str::trim_end).collect();
        assert_eq!(
            lines[1],
            "ZONE zone-a: 3 of 4 Service ports prefer endpoints here; 2 send traffic beyond them now"
        );
        assert!(
            lines[3].starts_with("  shop/web")
                && lines[3].ends_with(
                    "spilling: over 4.0 requests in flight per preferred endpoint (back at 2.0)"
                ),
            "{out}"
        );
        assert!(
            lines[4].contains("zone_hints")
                && lines[4].ends_with("no ready endpoint preferred here: failing over"),
            "{out}"
        );
        assert_eq!(lines.len(), 5, "{out}");
        let mut none = String::new();
        zones(
            &mut none,
            &serde_json::json!({"zones": {"local_zone": null}}),
        );
        assert!(none.is_empty(), "nothing without a zone");
    }
}
