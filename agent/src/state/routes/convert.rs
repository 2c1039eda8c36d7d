//! Conversion and validation: a route's spec as written (`spec.rs`) into the rules the proxy
//! applies (`rule.rs`). Conversion is strict and names the first field that is wrong.

use std::{sync::Arc, time::Duration};

use hyper::{
    Method,
    header::{HeaderName, HeaderValue},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use regex::Regex;

use super::{
    ServiceName,
    rule::{
        Backend, HeaderModifier, PathMatch, PathModifier, Redirect, RequestMatch, Retry, Rule,
        UrlRewrite, ValueMatch,
    },
    spec::{
        BackendRefSpec, FilterSpec, HeaderModifierSpec, HeaderSpec, MatchSpec, PathModifierSpec,
        RouteSpec, RuleSpec, ValueMatchSpec,
    },
};
use crate::k8s::objects::{Http, HttpRouteObject, RouteKind};

/// Which route: its kind and `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RouteKey {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: &'static str,
    /// `namespace/name`.
    pub name: String,
}

impl RouteKey {
    /// How logs, metrics and the config dump name the route: `namespace/name` for an
    /// HTTPRoute (the common case), `GRPCRoute namespace/name` for a GRPCRoute.
    pub fn label(&self) -> String {
        if self.kind == Http::KIND {
            self.name.clone()
        } else {
            format!("{} {}", self.kind, self.name)
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{} {}: {field}: {message}", route.kind, route.name)]
pub struct RouteError {
    pub route: RouteKey,
    pub field: String,
    pub message: String,
}

/// Gateway API durations: 1–4 groups of a number and a unit (h, m, s, ms), e.g. `1m30s`.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let bad = || InvalidDuration(text.to_owned());
    let mut total = Duration::ZERO;
    let mut rest = text;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(number).map_err(|_| bad())?;
        groups += 1;
    }
    if groups == 0 || groups > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// A duration that is not in the Gateway API's format.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0:?} is not a Gateway API duration (e.g. 500ms, 10s, 1m30s)")]
pub struct InvalidDuration(String);

/// A route converted, with what the table needs to index and order it.
#[derive(Debug)]
pub(super) struct ConvertedRoute {
    pub(super) namespace: String,
    pub(super) created: Option<String>,
    pub(super) parents: Vec<(ServiceName, Option<u16>)>,
    pub(super) rules: Vec<(Vec<RequestMatch>, Arc<Rule>)>,
}

pub(super) fn route_error(key: &RouteKey, field: &str, message: String) -> RouteError {
    RouteError {
        route: key.clone(),
        field: field.to_owned(),
        message,
    }
}

/// Converts one HTTPRoute, naming the first field that is wrong.
pub(super) fn convert(
    namespace: &str,
    key: &RouteKey,
    object: &HttpRouteObject,
) -> Result<ConvertedRoute, RouteError> {
    let spec: RouteSpec = parse_spec(key, &object.spec)?;
    convert_spec(namespace, key, spec, &object.metadata)
}

/// A route's spec as written, or the field that does not deserialize.
pub(super) fn parse_spec<T: serde::de::DeserializeOwned>(
    key: &RouteKey,
    spec: &serde_json::Value,
) -> Result<T, RouteError> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let field = match e.path().to_string().as_str() {
            "." => "spec".to_owned(),
            path => format!("spec.{path}"),
        };
        route_error(key, &field, e.into_inner().to_string())
    })
}

/// Converts a route's spec, in the form of an HTTPRoute's (a GRPCRoute's is translated to
/// it first, grpc.rs).
pub(super) fn convert_spec(
    namespace: &str,
    key: &RouteKey,
    spec: RouteSpec,
    metadata: &ObjectMeta,
) -> Result<ConvertedRoute, RouteError> {
    let error = |field: &str, message: String| route_error(key, field, message);
    let mut parents = Vec::new();
    for (i, parent) in spec.parent_refs.iter().enumerate() {
        let is_service = parent.kind.as_deref() == Some("Service")
            && parent.group.as_deref().unwrap_or("").is_empty();
        if !is_service {
            // A Gateway parent: not the mesh's business.
            continue;
        }
        let parent_namespace = parent.namespace.as_deref().unwrap_or(namespace);
        if parent.name.is_empty() {
            return Err(error(&format!("spec.parentRefs[{i}].name"), "empty".into()));
        }
        parents.push((format!("{parent_namespace}/{}", parent.name), parent.port));
    }
    let rules = spec
        .rules
        .iter()
        .enumerate()
        .map(|(r, rule)| convert_rule(rule, &format!("spec.rules[{r}]"), namespace, key))
        .collect::<Result<_, _>>()?;
    Ok(ConvertedRoute {
        namespace: namespace.to_owned(),
        created: metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        parents,
        rules,
    })
}

/// One rule at `at` (`spec.rules[N]`): its matches and what it does.
fn convert_rule(
    rule: &RuleSpec,
    at: &str,
    namespace: &str,
    key: &RouteKey,
) -> Result<(Vec<RequestMatch>, Arc<Rule>), RouteError> {
    let error = |field: &str, message: String| route_error(key, field, message);
    let field = |rest: &str| format!("{at}{rest}");
    let matches = if rule.matches.is_empty() {
        vec![convert_match(
            &MatchSpec::default(),
            &field(".matches[0]"),
            key,
        )?]
    } else {
        rule.matches
            .iter()
            .enumerate()
            .map(|(m, spec)| convert_match(spec, &field(&format!(".matches[{m}]")), key))
            .collect::<Result<_, _>>()?
    };
    let mut converted = Rule::default();
    for (f, filter) in rule.filters.iter().enumerate() {
        convert_filter(
            filter,
            &field(&format!(".filters[{f}]")),
            key,
            &mut converted,
        )?;
    }
    if converted.redirect.is_some() && converted.rewrite.is_some() {
        return Err(error(
            &field(".filters"),
            "RequestRedirect and URLRewrite cannot be used together".into(),
        ));
    }
    for (b, backend) in rule.backend_refs.iter().enumerate() {
        let backend = convert_backend(
            backend,
            &field(&format!(".backendRefs[{b}]")),
            namespace,
            key,
        )?;
        converted.backends.push(backend);
    }
    if let Some(timeouts) = &rule.timeouts {
        let duration = |text: &Option<String>, name: &str| {
            text.as_deref()
                .map(|t| {
                    parse_duration(t)
                        .map_err(|m| error(&field(&format!(".timeouts.{name}")), m.to_string()))
                })
                .transpose()
        };
        converted.request_timeout = duration(&timeouts.request, "request")?;
        converted.backend_timeout = duration(&timeouts.backend_request, "backendRequest")?;
        if let (Some(request), Some(backend)) =
            (converted.request_timeout, converted.backend_timeout)
            && backend > request
        {
            return Err(error(
                &field(".timeouts.backendRequest"),
                "longer than timeouts.request".into(),
            ));
        }
    }
    if let Some(retry) = &rule.retry {
        let backoff = retry
            .backoff
            .as_deref()
            .map(|b| parse_duration(b).map_err(|m| error(&field(".retry.backoff"), m.to_string())))
            .transpose()?
            .unwrap_or(Duration::from_millis(25));
        if let Some(code) = retry.codes.iter().find(|c| !(500..600).contains(*c)) {
            return Err(error(
                &field(".retry.codes"),
                format!("{code} (only 5xx codes are retried)"),
            ));
        }
        converted.retry = Some(Retry {
            attempts: retry.attempts.unwrap_or(1).min(10),
            codes: if retry.codes.is_empty() {
                vec![503]
            } else {
                retry.codes.clone()
            },
            backoff,
        });
    }
    Ok((matches, Arc::new(converted)))
}

/// One filter at `at` (`spec.rules[N].filters[M]`), applied to `converted`.
fn convert_filter(
    filter: &FilterSpec,
    at: &str,
    key: &RouteKey,
    converted: &mut Rule,
) -> Result<(), RouteError> {
    let error = |field: &str, message: String| route_error(key, field, message);
    let missing = |what: &str| error(at, format!("type {} without `{what}`", filter.kind));
    match filter.kind.as_str() {
        "RequestHeaderModifier" => {
            let spec = filter
                .request_header_modifier
                .as_ref()
                .ok_or_else(|| missing("requestHeaderModifier"))?;
            converted.request_headers = Some(convert_modifier(spec, at, key)?);
        }
        "ResponseHeaderModifier" => {
            let spec = filter
                .response_header_modifier
                .as_ref()
                .ok_or_else(|| missing("responseHeaderModifier"))?;
            converted.response_headers = Some(convert_modifier(spec, at, key)?);
        }
        "URLRewrite" => {
            let spec = filter
                .url_rewrite
                .as_ref()
                .ok_or_else(|| missing("urlRewrite"))?;
            converted.rewrite = Some(UrlRewrite {
                hostname: spec
                    .hostname
                    .as_deref()
                    .map(|h| {
                        HeaderValue::from_str(h)
                            .map_err(|_| error(at, format!("hostname {h:?} is invalid")))
                    })
                    .transpose()?,
                path: spec
                    .path
                    .as_ref()
                    .map(|p| convert_path_modifier(p, at, key))
                    .transpose()?,
            });
        }
        "RequestRedirect" => {
            let spec = filter
                .request_redirect
                .as_ref()
                .ok_or_else(|| missing("requestRedirect"))?;
            let status = spec.status_code.unwrap_or(302);
            if status != 301 && status != 302 {
                return Err(error(
                    &format!("{at}.requestRedirect.statusCode"),
                    format!("{status} (must be 301 or 302)"),
                ));
            }
            converted.redirect = Some(Redirect {
                scheme: spec.scheme.clone(),
                hostname: spec.hostname.clone(),
                path: spec
                    .path
                    .as_ref()
                    .map(|p| convert_path_modifier(p, at, key))
                    .transpose()?,
                port: spec.port,
                status,
            });
        }
        other => {
            return Err(error(
                &format!("{at}.type"),
                format!(
                    "{other:?} is not supported (RequestHeaderModifier, \
                     ResponseHeaderModifier, URLRewrite, RequestRedirect are)"
                ),
            ));
        }
    }
    Ok(())
}

/// One backendRef at `at` (`spec.rules[N].backendRefs[M]`): a Service in the route's namespace.
fn convert_backend(
    backend: &BackendRefSpec,
    at: &str,
    namespace: &str,
    key: &RouteKey,
) -> Result<Backend, RouteError> {
    let error = |field: &str, message: String| route_error(key, field, message);
    let kind = backend.kind.as_deref().unwrap_or("Service");
    if kind != "Service" || !backend.group.as_deref().unwrap_or("").is_empty() {
        return Err(error(
            &format!("{at}.kind"),
            format!("{kind:?}: only core Services can be backends"),
        ));
    }
    if !backend.filters.is_empty() {
        return Err(error(
            &format!("{at}.filters"),
            "per-backend filters are not supported (the rule's filters are)".into(),
        ));
    }
    let backend_namespace = backend.namespace.as_deref().unwrap_or(namespace);
    if backend_namespace != namespace {
        return Err(error(
            &format!("{at}.namespace"),
            format!(
                "{backend_namespace:?}: backends in another namespace need a \
                 ReferenceGrant, which nodemesh does not support yet"
            ),
        ));
    }
    let port = backend.port.ok_or_else(|| {
        error(
            &format!("{at}.port"),
            "required for a Service backend".into(),
        )
    })?;
    let weight = backend.weight.unwrap_or(1);
    let weight = u32::try_from(weight)
        .ok()
        .filter(|w| *w <= 1_000_000)
        .ok_or_else(|| {
            error(
                &format!("{at}.weight"),
                format!("{weight} (must be 0..=1000000)"),
            )
        })?;
    Ok(Backend {
        service: format!("{backend_namespace}/{}", backend.name),
        port,
        weight,
    })
}

fn convert_match(spec: &MatchSpec, at: &str, key: &RouteKey) -> Result<RequestMatch, RouteError> {
    let error = |field: String, message: String| RouteError {
        route: key.clone(),
        field,
        message,
    };
    let path = match &spec.path {
        None => PathMatch::Prefix("/".into()),
        Some(path) => {
            if path.kind != "RegularExpression" && !path.value.starts_with('/') {
                return Err(error(
                    format!("{at}.path.value"),
                    format!("{:?} must start with /", path.value),
                ));
            }
            match path.kind.as_str() {
                "Exact" => PathMatch::Exact(path.value.clone()),
                "PathPrefix" => PathMatch::Prefix(path.value.clone()),
                "RegularExpression" => PathMatch::Regex(
                    anchored(&path.value)
                        .map_err(|m| error(format!("{at}.path.value"), m.to_string()))?,
                ),
                other => {
                    return Err(error(
                        format!("{at}.path.type"),
                        format!("{other:?} (Exact, PathPrefix or RegularExpression)"),
                    ));
                }
            }
        }
    };
    let value_match = |spec: &ValueMatchSpec, field: String| match spec.kind.as_str() {
        "Exact" => Ok(ValueMatch::Exact(spec.value.clone())),
        "RegularExpression" => anchored(&spec.value)
            .map(ValueMatch::Regex)
            .map_err(|m| error(format!("{field}.value"), m.to_string())),
        other => Err(error(
            format!("{field}.type"),
            format!("{other:?} (Exact or RegularExpression)"),
        )),
    };
    let mut headers = Vec::new();
    for (h, header) in spec.headers.iter().enumerate() {
        let field = format!("{at}.headers[{h}]");
        let name = HeaderName::from_bytes(header.name.as_bytes()).map_err(|_| {
            error(
                format!("{field}.name"),
                format!("{:?} is not a header name", header.name),
            )
        })?;
        headers.push((name, value_match(header, field)?));
    }
    let mut query = Vec::new();
    for (q, param) in spec.query_params.iter().enumerate() {
        let field = format!("{at}.queryParams[{q}]");
        query.push((param.name.clone(), value_match(param, field)?));
    }
    let method = spec
        .method
        .as_deref()
        .map(|m| {
            Method::from_bytes(m.as_bytes())
                .map_err(|_| error(format!("{at}.method"), format!("{m:?} is not a method")))
        })
        .transpose()?;
    Ok(RequestMatch {
        path,
        headers,
        query,
        method,
        grpc: None,
    })
}

/// Gateway API regular expressions match the whole value.
pub(super) fn anchored(pattern: &str) -> Result<Regex, InvalidRegex> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|source| InvalidRegex {
            pattern: pattern.to_owned(),
            source,
        })
}

#[derive(Debug, thiserror::Error)]
#[error("invalid regular expression {pattern:?}: {source}")]
pub(super) struct InvalidRegex {
    pattern: String,
    source: regex::Error,
}

fn convert_modifier(
    spec: &HeaderModifierSpec,
    at: &str,
    key: &RouteKey,
) -> Result<HeaderModifier, RouteError> {
    let error = |message: String| RouteError {
        route: key.clone(),
        field: at.to_owned(),
        message,
    };
    let pair = |h: &HeaderSpec| {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| error(format!("{:?} is not a header name", h.name)))?;
        let value = HeaderValue::from_str(&h.value)
            .map_err(|_| error(format!("{:?} is not a header value", h.value)))?;
        Ok::<_, RouteError>((name, value))
    };
    Ok(HeaderModifier {
        set: spec.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: spec.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: spec
            .remove
            .iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| error(format!("{n:?} is not a header name")))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn convert_path_modifier(
    spec: &PathModifierSpec,
    at: &str,
    key: &RouteKey,
) -> Result<PathModifier, RouteError> {
    let error = |message: String| RouteError {
        route: key.clone(),
        field: format!("{at}.path"),
        message,
    };
    match spec.kind.as_str() {
        "ReplaceFullPath" => spec
            .replace_full_path
            .clone()
            .map(PathModifier::ReplaceFullPath)
            .ok_or_else(|| error("ReplaceFullPath without replaceFullPath".into())),
        "ReplacePrefixMatch" => spec
            .replace_prefix_match
            .clone()
            .map(PathModifier::ReplacePrefixMatch)
            .ok_or_else(|| error("ReplacePrefixMatch without replacePrefixMatch".into())),
        other => Err(error(format!(
            "type {other:?} (ReplaceFullPath or ReplacePrefixMatch)"
        ))),
    }
}
