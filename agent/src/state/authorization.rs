//! nodemesh's AuthorizationPolicy (`nodemesh.io/v1alpha1`): who may talk to a workload.
//!
//! A policy is namespace-scoped and selects the workloads of its namespace whose labels match
//! `spec.selector.matchLabels` (no selector: all of them). Its `action` is `ALLOW` (default)
//! or `DENY`; each rule has `from` sources (SPIFFE `principals`, `namespaces`,
//! `serviceAccounts`) and `to` operations (`ports`, HTTP `methods` and `paths`). A rule
//! matches when one of its sources and one of its operations match (an absent list matches
//! anything); inside one source or operation every field given must match.
//!
//! Decision for a request to a workload: DENY if any DENY rule matches; otherwise, if any
//! ALLOW policy selects the workload, ALLOW only if one of its rules matches; otherwise
//! ALLOW (the mesh's default). An ALLOW policy without rules therefore denies everything.
//!
//! Methods and paths are L7 attributes: they are evaluated per HTTP request at the
//! destination. For traffic that is not HTTP (or before the HTTP request is known), an ALLOW
//! rule that names them cannot match, and a DENY rule that names them matches on its other
//! fields alone: unknown is never a reason to allow (the way Istio treats TCP traffic).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Deserialize;

use crate::{
    identity::spiffe::SpiffeId,
    k8s::{compact::LocalPod, objects::AuthorizationPolicyObject},
};

#[derive(Debug, thiserror::Error)]
#[error("AuthorizationPolicy {policy}: {field}: {message}")]
pub struct PolicyError {
    pub policy: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicySpec {
    #[serde(default)]
    selector: Option<SelectorSpec>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SelectorSpec {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default)]
    from: Vec<SourceSpec>,
    #[serde(default)]
    to: Vec<OperationSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceSpec {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationSpec {
    #[serde(default)]
    ports: Vec<u16>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// A string pattern: exact, `prefix*`, `*suffix`, or `*`.
#[derive(Debug)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn new(text: &str) -> Self {
        if text == "*" {
            Self::Any
        } else if let Some(prefix) = text.strip_suffix('*') {
            Self::Prefix(prefix.to_owned())
        } else if let Some(suffix) = text.strip_prefix('*') {
            Self::Suffix(suffix.to_owned())
        } else {
            Self::Exact(text.to_owned())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(exact) => value == exact,
            Self::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Self::Suffix(suffix) => value.ends_with(suffix.as_str()),
        }
    }
}

#[derive(Debug, Default)]
struct Source {
    principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    /// (namespace, name).
    service_accounts: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct Operation {
    ports: Vec<u16>,
    methods: Vec<String>,
    paths: Vec<Pattern>,
}

impl Operation {
    fn inspects_http(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty()
    }
}

#[derive(Debug)]
struct PolicyRule {
    from: Vec<Source>,
    to: Vec<Operation>,
}

/// One converted policy.
#[derive(Debug)]
pub struct Policy {
    /// `namespace/name`.
    pub name: String,
    namespace: String,
    match_labels: BTreeMap<String, String>,
    pub action: Action,
    rules: Vec<PolicyRule>,
}

/// What is known about a request when a decision is made.
pub struct RequestAttributes<'a> {
    /// The peer's verified identity; None for plaintext.
    pub source: Option<&'a SpiffeId>,
    pub port: u16,
    /// (method, path) once the HTTP request is known.
    pub http: Option<(&'a str, &'a str)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied, and by which policy (`namespace/name`), or by the absence of a matching ALLOW.
    Deny(String),
}

impl Policy {
    fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace
            && self
                .match_labels
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    }

    /// Whether deciding on traffic to `port` can need the HTTP method or path.
    pub fn inspects_http(&self, port: u16) -> bool {
        self.rules.iter().any(|rule| {
            rule.to
                .iter()
                .any(|op| op.inspects_http() && (op.ports.is_empty() || op.ports.contains(&port)))
        })
    }

    fn matches(&self, request: &RequestAttributes<'_>) -> bool {
        self.rules.iter().any(|rule| {
            let from =
                rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, request.source));
            let to =
                rule.to.is_empty() || rule.to.iter().any(|op| self.operation_matches(op, request));
            from && to
        })
    }

    fn operation_matches(&self, op: &Operation, request: &RequestAttributes<'_>) -> bool {
        if !op.ports.is_empty() && !op.ports.contains(&request.port) {
            return false;
        }
        if !op.inspects_http() {
            return true;
        }
        match request.http {
            Some((method, path)) => {
                (op.methods.is_empty() || op.methods.iter().any(|m| m == method))
                    && (op.paths.is_empty() || op.paths.iter().any(|p| p.matches(path)))
            }
            // HTTP attributes unknown: an ALLOW cannot rely on them, a DENY applies anyway.
            None => self.action == Action::Deny,
        }
    }
}

fn source_matches(source: &Source, peer: Option<&SpiffeId>) -> bool {
    let empty = source.principals.is_empty()
        && source.namespaces.is_empty()
        && source.service_accounts.is_empty();
    if empty {
        return true;
    }
    let Some(peer) = peer else {
        // Plaintext has no identity: only an empty source matches it.
        return false;
    };
    let principal = peer.to_string();
    (source.principals.is_empty() || source.principals.iter().any(|p| p.matches(&principal)))
        && (source.namespaces.is_empty()
            || source
                .namespaces
                .iter()
                .any(|p| p.matches(peer.namespace())))
        && (source.service_accounts.is_empty()
            || source
                .service_accounts
                .iter()
                .any(|(ns, sa)| ns == peer.namespace() && sa == peer.service_account()))
}

/// Decides on a meshed `peer`'s stream to `port` as a whole, without HTTP attributes: an L4
/// tunnel, or a stream no request decision covers (upgraded, opaque).
pub fn decide_stream(policies: &[Arc<Policy>], peer: &SpiffeId, port: u16) -> Decision {
    let request = RequestAttributes {
        source: Some(peer),
        port,
        http: None,
    };
    decide(policies, &request)
}

/// Decides on `request` under `policies` (those selecting the destination workload).
pub fn decide(policies: &[Arc<Policy>], request: &RequestAttributes<'_>) -> Decision {
    if let Some(deny) = policies
        .iter()
        .find(|p| p.action == Action::Deny && p.matches(request))
    {
        return Decision::Deny(deny.name.clone());
    }
    let mut allows = policies
        .iter()
        .filter(|p| p.action == Action::Allow)
        .peekable();
    if allows.peek().is_none() {
        return Decision::Allow;
    }
    let allow_names: Vec<&str> = policies
        .iter()
        .filter(|p| p.action == Action::Allow)
        .map(|p| p.name.as_str())
        .collect();
    if allows.any(|p| p.matches(request)) {
        Decision::Allow
    } else {
        Decision::Deny(format!(
            "no rule of ALLOW policies {}",
            allow_names.join(", ")
        ))
    }
}

/// Policies by workload, rebuilt with the cluster state.
#[derive(Debug, Default)]
pub struct AuthorizationIndex {
    /// Converted policies by `namespace/name` (the last good version of each).
    converted: BTreeMap<String, Arc<Policy>>,
    /// Policies selecting each local pod, by `namespace/name` of the pod.
    by_pod: HashMap<String, Vec<Arc<Policy>>>,
}

/// A policy as the config dump shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PolicyView {
    pub policy: String,
    pub action: Action,
    pub rules: usize,
    /// Local pods it selects.
    pub selects: Vec<String>,
}

impl AuthorizationIndex {
    /// Converts every policy (a bad one keeps its version from `previous`) and finds the
    /// policies of every pod in `pods`.
    pub fn build<'a>(
        policies: &BTreeMap<(String, String), AuthorizationPolicyObject>,
        pods: impl Iterator<Item = &'a LocalPod>,
        previous: &AuthorizationIndex,
    ) -> (Self, Vec<PolicyError>) {
        let mut errors = Vec::new();
        let mut converted = BTreeMap::new();
        for ((namespace, name), object) in policies {
            let key = format!("{namespace}/{name}");
            match convert(namespace, &key, object) {
                Ok(policy) => {
                    converted.insert(key, Arc::new(policy));
                }
                Err(error) => {
                    errors.push(error);
                    if let Some(good) = previous.converted.get(&key) {
                        converted.insert(key, Arc::clone(good));
                    }
                }
            }
        }
        let mut by_pod = HashMap::new();
        for pod in pods {
            let selecting: Vec<Arc<Policy>> = converted
                .values()
                .filter(|p| p.selects(&pod.namespace, &pod.labels))
                .cloned()
                .collect();
            if !selecting.is_empty() {
                by_pod.insert(format!("{}/{}", pod.namespace, pod.name), selecting);
            }
        }
        (Self { converted, by_pod }, errors)
    }

    /// The policies selecting the pod `namespace/name`.
    pub fn for_pod(&self, pod: &str) -> Vec<Arc<Policy>> {
        self.by_pod.get(pod).cloned().unwrap_or_default()
    }

    pub fn views(&self) -> Vec<PolicyView> {
        self.converted
            .values()
            .map(|policy| PolicyView {
                policy: policy.name.clone(),
                action: policy.action,
                rules: policy.rules.len(),
                selects: {
                    let mut pods: Vec<String> = self
                        .by_pod
                        .iter()
                        .filter(|(_, list)| list.iter().any(|p| Arc::ptr_eq(p, policy)))
                        .map(|(pod, _)| pod.clone())
                        .collect();
                    pods.sort();
                    pods
                },
            })
            .collect()
    }
}

fn convert(
    namespace: &str,
    key: &str,
    object: &AuthorizationPolicyObject,
) -> Result<Policy, PolicyError> {
    let error = |field: String, message: String| PolicyError {
        policy: key.to_owned(),
        field,
        message,
    };
    let spec: PolicySpec = serde_path_to_error::deserialize(&object.spec).map_err(|e| {
        let field = match e.path().to_string().as_str() {
            "." => "spec".to_owned(),
            path => format!("spec.{path}"),
        };
        error(field, e.into_inner().to_string())
    })?;
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        other => {
            return Err(error(
                "spec.action".into(),
                format!("{other:?} (ALLOW or DENY)"),
            ));
        }
    };
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().enumerate() {
        let mut from = Vec::new();
        for (s, source) in rule.from.iter().enumerate() {
            let mut service_accounts = Vec::new();
            for (a, account) in source.service_accounts.iter().enumerate() {
                let (ns, sa) = account.split_once('/').unwrap_or((namespace, account));
                if sa.is_empty() || ns.is_empty() || sa.contains('/') {
                    return Err(error(
                        format!("spec.rules[{r}].from[{s}].serviceAccounts[{a}]"),
                        format!("{account:?} (namespace/name, or name in the policy's namespace)"),
                    ));
                }
                service_accounts.push((ns.to_owned(), sa.to_owned()));
            }
            for (p, principal) in source.principals.iter().enumerate() {
                if principal != "*"
                    && !principal.starts_with("spiffe://")
                    && !principal.starts_with('*')
                {
                    return Err(error(
                        format!("spec.rules[{r}].from[{s}].principals[{p}]"),
                        format!(
                            "{principal:?} is not a SPIFFE ID (spiffe://<trust domain>/ns/<namespace>/sa/<account>) or a pattern"
                        ),
                    ));
                }
            }
            from.push(Source {
                principals: source.principals.iter().map(|p| Pattern::new(p)).collect(),
                namespaces: source.namespaces.iter().map(|n| Pattern::new(n)).collect(),
                service_accounts,
            });
        }
        let mut to = Vec::new();
        for (o, operation) in rule.to.iter().enumerate() {
            if operation.ports.contains(&0) {
                return Err(error(
                    format!("spec.rules[{r}].to[{o}].ports"),
                    "port 0".into(),
                ));
            }
            for (p, path) in operation.paths.iter().enumerate() {
                if path != "*" && !path.starts_with('/') && !path.starts_with('*') {
                    return Err(error(
                        format!("spec.rules[{r}].to[{o}].paths[{p}]"),
                        format!("{path:?} must start with / (or be a *suffix pattern)"),
                    ));
                }
            }
            to.push(Operation {
                ports: operation.ports.clone(),
                methods: operation
                    .methods
                    .iter()
                    .map(|m| m.to_ascii_uppercase())
                    .collect(),
                paths: operation.paths.iter().map(|p| Pattern::new(p)).collect(),
            });
        }
        rules.push(PolicyRule { from, to });
    }
    Ok(Policy {
        name: key.to_owned(),
        namespace: namespace.to_owned(),
        match_labels: spec.selector.map(|s| s.match_labels).unwrap_or_default(),
        action,
        rules,
    })
}

#[cfg(test)]
mod tests;
