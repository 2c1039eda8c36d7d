//! `nodemesh top` across the cluster: the same live view as on a node, over every agent's
//! metrics. Two ways to get them:
//!
//! - By default through the API server's `pods/proxy` subresource to each agent pod's
//!   metrics port: nothing else has to be installed, and it is as fresh as the view's
//!   interval. It costs one proxied request per node per interval, and the operator needs
//!   `get pods/proxy` in the agents' namespace. Good for tens of nodes.
//! - With `--prometheus URL`: Prometheus's `/federate` endpoint, one request for the whole
//!   cluster, no pod proxy rights; as fresh as Prometheus's scrape interval (use a view
//!   interval at least that long). The way for large clusters.
//!
//! Either way every agent reports the requests its own pods send (`reporter="source"`), so
//! adding the agents' samples counts each request once.

use std::{net::ToSocketAddrs, time::Duration};

use hyper::http;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

use super::{ClusterClient, ClusterError};
use crate::cli::{admin_client::AdminClient, top::Scrape};

/// The series the view reads.
const SERIES: &str = r#"{__name__=~"istio_requests_total|istio_request_duration_milliseconds_bucket",reporter="source"}"#;

/// Every agent pod's metrics through the API server.
pub struct AgentPods {
    pub cluster: ClusterClient,
    pub namespace: String,
    pub selector: String,
    pub port: u16,
    /// How many agents answered the last scrape, of how many.
    answered: (usize, usize),
}

impl AgentPods {
    pub fn new(cluster: ClusterClient, namespace: &str, selector: &str, port: u16) -> Self {
        Self {
            cluster,
            namespace: namespace.to_owned(),
            selector: selector.to_owned(),
            port,
            answered: (0, 0),
        }
    }
}

impl Scrape for AgentPods {
    fn scrape(&mut self) -> anyhow::Result<String> {
        let client = self.cluster.client();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &self.namespace);
        let (namespace, port) = (self.namespace.clone(), self.port);
        let list = ListParams::default().labels(&self.selector);
        let (text, answered) = self.cluster.block_on(async move {
            let pods = pods
                .list_metadata(&list)
                .await
                .map_err(ClusterError::api(format!(
                    "listing the agent pods in {namespace}"
                )))?;
            let mut text = String::new();
            let mut answered = (0, pods.items.len());
            let mut last_error = None;
            for name in pods.items.into_iter().filter_map(|p| p.metadata.name) {
                let path =
                    format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy/metrics");
                let request = http::Request::get(path).body(Vec::new())?;
                match client.request_text(request).await {
                    Ok(body) => {
                        text.push_str(&body);
                        text.push('\n');
                        answered.0 += 1;
                    }
                    Err(error) => last_error = Some(format!("{name}: {error}")),
                }
            }
            if answered.0 == 0 && answered.1 > 0 {
                anyhow::bail!(
                    "no agent's metrics came through the API server's pod proxy (last: {}); \
                     does your user have `get pods/proxy` in {namespace}, and do the agents \
                     run with --metrics-addr on port {port}?",
                    last_error.unwrap_or_default()
                );
            }
            Ok::<_, anyhow::Error>((text, answered))
        })?;
        self.answered = answered;
        Ok(text)
    }

    fn describe(&self) -> String {
        format!(
            "{} agents in {} via the API server ({} answered)",
            self.answered.1, self.namespace, self.answered.0
        )
    }
}

/// Prometheus's federation endpoint.
pub struct Prometheus {
    client: AdminClient,
    url: String,
}

impl Prometheus {
    /// `url` is `http://host:port` (no TLS, no path prefix).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let authority = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow::anyhow!("--prometheus {url}: only http://host:port URLs"))?
            .trim_end_matches('/');
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| anyhow::anyhow!("--prometheus {url}: {e}"))?
            .next()
            .ok_or_else(|| anyhow::anyhow!("--prometheus {url}: no address"))?;
        Ok(Self {
            client: AdminClient::new(addr)?,
            url: url.to_owned(),
        })
    }
}

impl Scrape for Prometheus {
    fn scrape(&mut self) -> anyhow::Result<String> {
        let path = format!("/federate?match[]={}", query_encode(SERIES));
        Ok(self.client.get_ok(&path)?)
    }

    fn describe(&self) -> String {
        format!("Prometheus at {}", self.url)
    }
}

/// The view's default interval for a source: Prometheus is only as fresh as its scrapes.
pub fn default_interval(prometheus: bool) -> Duration {
    Duration::from_secs(if prometheus { 15 } else { 1 })
}

/// A query parameter's value, form-encoded (`form_urlencoded`, as Prometheus parses it).
fn query_encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_federation_selector_is_encoded_whole() {
        let encoded = query_encode(SERIES);
        assert!(
            encoded.starts_with("%7B__name__%3D%7E%22istio_requests_total%7C"),
            "{encoded}"
        );
        assert!(!encoded.contains(['{', '"', '|', ',', '=']), "{encoded}");
    }
}
