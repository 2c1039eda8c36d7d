//! SPIFFE IDs of Kubernetes workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(into = "String")]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("{0:?}: a SPIFFE ID starts with spiffe://")]
    Scheme(String),
    #[error("{0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error(
        "trust domain {0:?}: lowercase letters, digits, '.', '-' and '_' only, 1..=255 characters"
    )]
    TrustDomain(String),
    #[error(
        "{what} {value:?}: not a Kubernetes name (lowercase letters, digits, '-' and '.', 1..=253 characters)"
    )]
    Name { what: &'static str, value: String },
}

impl SpiffeId {
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        if trust_domain.is_empty()
            || trust_domain.len() > 255
            || !trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(SpiffeIdError::TrustDomain(trust_domain.to_owned()));
        }
        check_name("namespace", namespace)?;
        check_name("service account", service_account)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn check_name(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    let valid = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !value.starts_with(['-', '.'])
        && !value.ends_with(['-', '.']);
    if valid {
        Ok(())
    } else {
        Err(SpiffeIdError::Name {
            what,
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> String {
        id.to_string()
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(text: &str) -> Result<Self, SpiffeIdError> {
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(text.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [trust_domain, "ns", namespace, "sa", service_account] => {
                SpiffeId::new(trust_domain, namespace, service_account)
            }
            _ => Err(SpiffeIdError::Shape(text.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_validates() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(
            (id.trust_domain(), id.namespace(), id.service_account()),
            ("cluster.local", "shop", "web")
        );
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            "\"spiffe://cluster.local/ns/shop/sa/web\""
        );
    }

    #[test]
    fn rejects_malformed_ids_saying_what_is_wrong() {
        for (text, expected) in [
            ("http://cluster.local/ns/a/sa/b", "starts with spiffe://"),
            ("spiffe://cluster.local/ns/a", "expected spiffe://"),
            (
                "spiffe://cluster.local/ns/a/sa/b/extra",
                "expected spiffe://",
            ),
            ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local/ns/A/sa/b", "namespace \"A\""),
            (
                "spiffe://cluster.local/ns/a/sa/-b",
                "service account \"-b\"",
            ),
            ("spiffe://cluster.local/ns//sa/b", "namespace \"\""),
        ] {
            let error = text.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
