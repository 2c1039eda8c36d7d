//! The real consumers of the agents' telemetry, next to the API server in the bridge
//! namespace: Prometheus (scraping with a config the test gives, usually the one
//! docs/telemetry.md documents) and an OpenTelemetry Collector (OTLP in, a JSON file out).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{
    control_plane::{API_SERVER_IP, ControlPlane},
    error::{IoContext, Result, TestbedError},
    http,
    wait::wait_until,
};

/// Prometheus's port on the bridge.
pub const PROMETHEUS_PORT: u16 = 9090;
/// The collector's OTLP/HTTP port on the bridge.
pub const OTLP_HTTP_PORT: u16 = 4318;

/// A Prometheus server of the testbed.
#[derive(Debug)]
pub struct Prometheus {
    netns: String,
}

impl ControlPlane {
    /// Starts Prometheus with `scrape_configs` (YAML, the list under `scrape_configs:`),
    /// scraping every second, with `{kubeconfig}` in it replaced by a kubeconfig that may
    /// list pods (for `kubernetes_sd_configs`); returns once it answers.
    pub fn start_prometheus(&self, scrape_configs: &str) -> Result<Prometheus> {
        let dir = self.dir().join("prometheus");
        std::fs::create_dir_all(&dir).io_context(|| format!("creating {}", dir.display()))?;
        let kubeconfig = self.admin_kubeconfig().display().to_string();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{}",
            indent(&scrape_configs.replace("{kubeconfig}", &kubeconfig), 2)
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)
            .io_context(|| format!("writing {}", config_path.display()))?;
        let mut command = Command::new(self.testenv().bin("prometheus")?);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!(
                "--web.listen-address={API_SERVER_IP}:{PROMETHEUS_PORT}"
            ));
        self.spawn("prometheus", command)?;
        let prometheus = Prometheus {
            netns: self.netns().to_owned(),
        };
        wait_until(Duration::from_secs(30), "Prometheus to be ready", || {
            Ok(prometheus.get("/-/ready")?.0 == 200)
        })?;
        Ok(prometheus)
    }

    /// Starts an OpenTelemetry Collector that receives OTLP (HTTP on
    /// [`OTLP_HTTP_PORT`], gRPC on 4317) and writes what it gets to a JSON-lines file.
    pub fn start_otel_collector(&self) -> Result<OtelCollector> {
        let dir = self.dir().join("otelcol");
        std::fs::create_dir_all(&dir).io_context(|| format!("creating {}", dir.display()))?;
        let out = dir.join("traces.jsonl");
        let config = format!(
            "receivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: {API_SERVER_IP}:{OTLP_HTTP_PORT}\n      grpc:\n        endpoint: {API_SERVER_IP}:4317\n\
             exporters:\n  file:\n    path: {}\n    format: json\n    flush_interval: 100ms\n\
             service:\n  telemetry:\n    metrics:\n      level: none\n  pipelines:\n    traces:\n      receivers: [otlp]\n      exporters: [file]\n",
            out.display()
        );
        let config_path = dir.join("config.yaml");
        std::fs::write(&config_path, config)
            .io_context(|| format!("writing {}", config_path.display()))?;
        let mut command = Command::new(self.testenv().bin("otelcol")?);
        command.arg(format!("--config={}", config_path.display()));
        self.spawn("otelcol", command)?;
        let collector = OtelCollector { out };
        let netns = self.netns().to_owned();
        wait_until(Duration::from_secs(30), "the collector to listen", || {
            // An empty POST is refused, but only a listening receiver answers at all.
            Ok(http::get_in_netns(
                &netns,
                (API_SERVER_IP, OTLP_HTTP_PORT).into(),
                "/v1/traces",
                Duration::from_secs(1),
            )
            .is_ok())
        })?;
        Ok(collector)
    }

    /// The OTLP/HTTP traces endpoint agents export to.
    pub fn otlp_traces_endpoint(&self) -> String {
        format!("http://{API_SERVER_IP}:{OTLP_HTTP_PORT}/v1/traces")
    }
}

impl Prometheus {
    fn get(&self, path: &str) -> Result<(u16, String)> {
        http::get_in_netns(
            &self.netns,
            (API_SERVER_IP, PROMETHEUS_PORT).into(),
            path,
            Duration::from_secs(5),
        )
    }

    /// Runs an instant query; returns the `data.result` vector.
    pub fn query(&self, promql: &str) -> Result<Vec<Value>> {
        let (status, body) = self.get(&format!(
            "/api/v1/query?query={}",
            form_urlencoded::byte_serialize(promql.as_bytes()).collect::<String>()
        ))?;
        let answer: Value = serde_json::from_str(&body).map_err(|e| {
            TestbedError::Other(format!("Prometheus answered {status}: {body} ({e})"))
        })?;
        if answer["status"] != "success" {
            return Err(TestbedError::Other(format!(
                "query {promql} failed ({status}): {body}"
            )));
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The value of a query that yields one sample (0 when it yields none).
    pub fn value(&self, promql: &str) -> Result<f64> {
        let result = self.query(promql)?;
        match result.as_slice() {
            [] => Ok(0.0),
            [sample] => sample["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| TestbedError::Other(format!("{promql}: odd sample {sample}"))),
            more => Err(TestbedError::Other(format!(
                "{promql} yields {} samples, not one: {more:?}",
                more.len()
            ))),
        }
    }

    /// The scrape targets Prometheus knows, with their health.
    pub fn targets(&self) -> Result<Value> {
        let (_, body) = self.get("/api/v1/targets")?;
        serde_json::from_str(&body)
            .map_err(|e| TestbedError::Other(format!("targets: {e}: {body}")))
    }
}

/// An OpenTelemetry Collector of the testbed and the file its exporter writes.
#[derive(Debug)]
pub struct OtelCollector {
    out: PathBuf,
}

impl OtelCollector {
    /// Every span the collector exported so far, as OTLP JSON span objects.
    pub fn spans(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .flat_map(|batch| {
                let mut spans = Vec::new();
                for resource in batch["resourceSpans"].as_array().into_iter().flatten() {
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        spans.extend(scope["spans"].as_array().into_iter().flatten().cloned());
                    }
                }
                spans
            })
            .collect()
    }

    /// The file the collector writes.
    pub fn output(&self) -> &Path {
        &self.out
    }
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|line| format!("{pad}{line}\n")).collect()
}
