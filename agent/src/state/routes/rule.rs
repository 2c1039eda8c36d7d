//! The converted form of a route's rules that the proxy applies: request matches (and how a
//! request is matched), header modifiers, rewrites, redirects, weighted backends, timeouts and
//! retries.

use std::time::Duration;

use hyper::{
    Method,
    header::{HeaderName, HeaderValue},
};
use regex::Regex;

use super::ServiceName;

#[derive(Debug)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/a` matches `/a` and `/a/b`, not `/ab`.
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
pub enum ValueMatch {
    Exact(String),
    Regex(Regex),
}

impl ValueMatch {
    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(expected) => value == expected,
            Self::Regex(regex) => regex.is_match(value),
        }
    }
}

#[derive(Debug)]
pub struct RequestMatch {
    pub path: PathMatch,
    pub headers: Vec<(HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<Method>,
    /// A GRPCRoute's match: it applies to gRPC calls only (`content-type: application/grpc`,
    /// not counted as a header match), ranked by the GRPCRoute order.
    pub grpc: Option<GrpcRank>,
}

/// How specific a GRPCRoute match is, in the GRPCRoute precedence order: the characters of
/// an exact service, then of an exact method (a regular expression counts none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpcRank {
    pub service_chars: usize,
    pub method_chars: usize,
}

#[derive(Debug, Default)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    pub fn apply(&self, headers: &mut hyper::HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug)]
pub struct UrlRewrite {
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub service: ServiceName,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

#[derive(Debug, Default)]
pub struct Rule {
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub rewrite: Option<UrlRewrite>,
    pub redirect: Option<Redirect>,
    pub backends: Vec<Backend>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
}

impl Rule {
    /// A backend drawn by weight with `draw` uniform in `0..total_weight`; None when every
    /// weight is zero (Gateway API: such a rule answers 500).
    pub fn backend(&self, draw: u64) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = draw % total;
        for backend in &self.backends {
            let weight = u64::from(backend.weight);
            if point < weight {
                return Some(backend);
            }
            point -= weight;
        }
        None
    }
}

/// The request as routing sees it.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a hyper::HeaderMap,
}

impl RequestMatch {
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Exact(p) => request.path == p,
            PathMatch::Prefix(p) => prefix_matches(p, request.path),
            PathMatch::Regex(r) => r.is_match(request.path),
        };
        path_ok
            && (self.grpc.is_none() || is_grpc(request.headers))
            && self.method.as_ref().is_none_or(|m| m == request.method)
            && self.headers.iter().all(|(name, matcher)| {
                request
                    .headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| matcher.matches(v)))
            })
            && self.query.iter().all(|(name, matcher)| {
                query_pairs(request.query).any(|(n, v)| n == name && matcher.matches(v))
            })
    }

    pub(super) fn clone_match(&self) -> Self {
        let clone_value = |m: &ValueMatch| match m {
            ValueMatch::Exact(s) => ValueMatch::Exact(s.clone()),
            ValueMatch::Regex(r) => ValueMatch::Regex(r.clone()),
        };
        Self {
            path: match &self.path {
                PathMatch::Exact(p) => PathMatch::Exact(p.clone()),
                PathMatch::Prefix(p) => PathMatch::Prefix(p.clone()),
                PathMatch::Regex(r) => PathMatch::Regex(r.clone()),
            },
            headers: self
                .headers
                .iter()
                .map(|(n, m)| (n.clone(), clone_value(m)))
                .collect(),
            query: self
                .query
                .iter()
                .map(|(n, m)| (n.clone(), clone_value(m)))
                .collect(),
            method: self.method.clone(),
            grpc: self.grpc,
        }
    }

    /// The path after a URL rewrite or redirect `modifier` applied under this match.
    pub fn rewrite_path(&self, modifier: &PathModifier, path: &str) -> String {
        match modifier {
            PathModifier::ReplaceFullPath(full) => full.clone(),
            PathModifier::ReplacePrefixMatch(replacement) => match &self.path {
                PathMatch::Prefix(prefix) if prefix_matches(prefix, path) => {
                    let rest = &path[prefix.trim_end_matches('/').len()..];
                    let base = replacement.trim_end_matches('/');
                    match (base.is_empty(), rest.is_empty()) {
                        (true, true) => "/".to_owned(),
                        (true, false) => rest.to_owned(),
                        (false, _) => format!("{base}{rest}"),
                    }
                }
                _ => path.to_owned(),
            },
        }
    }
}

/// Gateway API prefix matching is by path element.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// A gRPC call: `content-type: application/grpc`, alone or with a `+format` or parameters.
fn is_grpc(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
}
