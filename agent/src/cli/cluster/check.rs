//! `nodemesh check`: the pre-flight before (and after) an install, through the API server.
//! Each check says ok, WARN (nodemesh runs, with something missing) or FAIL (it cannot work
//! as installed), and what to do about it. The exit status is non-zero when one fails.

use std::{fmt::Write, time::SystemTime};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Namespace, Node, Pod, Secret},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, api::ListParams};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{ClusterClient, ClusterError};
use crate::{
    cli::status::human,
    datapath::{KERNEL_FLOOR, kernel_version},
    k8s::labels::MESH_LABEL,
};

/// The CRDs nodemesh reads, and what is lost without each.
const CRDS: [(&str, &str, bool); 4] = [
    (
        "httproutes.gateway.networking.k8s.io",
        "Gateway API HTTPRoutes: L7 routing stays off until they are installed \
         (kubectl apply --server-side -f standard-install.yaml of Gateway API v1.x)",
        false,
    ),
    (
        "grpcroutes.gateway.networking.k8s.io",
        "Gateway API GRPCRoutes: gRPC routing stays off until they are installed \
         (standard-install.yaml of Gateway API v1.1 or later)",
        false,
    ),
    (
        "authorizationpolicies.nodemesh.io",
        "nodemesh's AuthorizationPolicy: the chart installs it (helm install nodemesh)",
        true,
    ),
    (
        "meshnodes.nodemesh.io",
        "nodemesh's MeshNode: the chart installs it (helm install nodemesh)",
        true,
    ),
];
const ISSUER_SECRET: &str = "nodemesh-issuer";
const TRUST_BUNDLE: &str = "nodemesh-trust-bundle";
const CA_SELECTOR: &str = "app.kubernetes.io/name=nodemesh-ca";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

/// One finding.
#[derive(Debug, PartialEq, Eq)]
pub struct Finding {
    pub verdict: Verdict,
    pub check: &'static str,
    pub message: String,
}

fn finding(verdict: Verdict, check: &'static str, message: impl Into<String>) -> Finding {
    Finding {
        verdict,
        check,
        message: message.into(),
    }
}

/// Runs every check against the cluster, `namespace` being the chart's.
pub fn run(cluster: &ClusterClient, namespace: &str) -> Result<Vec<Finding>, ClusterError> {
    let client = cluster.client();
    cluster.block_on(async {
        let mut findings = Vec::new();
        let nodes: Api<Node> = Api::all(client.clone());
        let nodes = nodes
            .list(&ListParams::default())
            .await
            .map_err(ClusterError::api("listing Nodes"))?;
        findings.extend(kernels(&nodes.items));
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for (name, what, required) in CRDS {
            let crd = crds
                .get_opt(name)
                .await
                .map_err(ClusterError::api(format!("reading CRD {name}")))?;
            findings.push(crd_finding(name, what, required, crd.as_ref()));
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let secret = secrets
            .get_opt(ISSUER_SECRET)
            .await
            .map_err(ClusterError::api(format!(
                "reading Secret {namespace}/{ISSUER_SECRET}"
            )))?;
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let bundle = maps
            .get_opt(TRUST_BUNDLE)
            .await
            .map_err(ClusterError::api(format!(
                "reading ConfigMap {namespace}/{TRUST_BUNDLE}"
            )))?;
        findings.extend(issuer_and_bundle(
            namespace,
            secret.as_ref(),
            bundle.as_ref(),
            SystemTime::now(),
        ));
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let ca_pods = pods
            .list(&ListParams::default().labels(CA_SELECTOR))
            .await
            .map_err(ClusterError::api(format!(
                "listing the CA's pods in {namespace}"
            )))?;
        findings.push(ca_readiness(namespace, &ca_pods.items));
        let namespaces: Api<Namespace> = Api::all(client);
        let meshed = namespaces
            .list_metadata(&ListParams::default().labels(&format!("{MESH_LABEL}=enabled")))
            .await
            .map_err(ClusterError::api("listing meshed namespaces"))?;
        let names: Vec<String> = meshed
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        findings.push(if names.is_empty() {
            finding(
                Verdict::Warn,
                "meshed namespaces",
                format!(
                    "no namespace opts in yet: kubectl label namespace <name> {MESH_LABEL}=enabled"
                ),
            )
        } else {
            finding(Verdict::Ok, "meshed namespaces", names.join(", "))
        });
        Ok(findings)
    })
}

/// Every node's kernel against the floor the datapath is proven on.
pub fn kernels(nodes: &[Node]) -> Vec<Finding> {
    let floor = format!("{}.{}", KERNEL_FLOOR.0, KERNEL_FLOOR.1);
    let mut findings = Vec::new();
    let mut fine = 0;
    for node in nodes {
        let name = node.metadata.name.as_deref().unwrap_or("?");
        let release = node
            .status
            .as_ref()
            .and_then(|s| s.node_info.as_ref())
            .map_or("", |i| i.kernel_version.as_str());
        match kernel_version(release) {
            Some(version) if version >= KERNEL_FLOOR => fine += 1,
            Some(_) => findings.push(finding(
                Verdict::Fail,
                "kernel",
                format!(
                    "node {name} runs kernel {release}, below nodemesh's floor {floor} \
                     (sk_lookup, cgroup hooks and socket cookies it needs): upgrade its kernel \
                     or keep the agent off it with a nodeSelector"
                ),
            )),
            None => findings.push(finding(
                Verdict::Warn,
                "kernel",
                format!(
                    "node {name} reports no kernel version ({release:?}); its agent checks at start"
                ),
            )),
        }
    }
    if findings.is_empty() {
        findings.push(finding(
            Verdict::Ok,
            "kernel",
            format!("{fine} nodes at or above {floor}"),
        ));
    }
    findings
}

fn crd_finding(
    name: &str,
    what: &str,
    required: bool,
    crd: Option<&CustomResourceDefinition>,
) -> Finding {
    let established = crd
        .and_then(|c| c.status.as_ref())
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        });
    match (crd, established) {
        (Some(_), true) => finding(Verdict::Ok, "CRDs", format!("{name} established")),
        (Some(_), false) => finding(
            Verdict::Fail,
            "CRDs",
            format!("{name} is not established yet: kubectl describe crd {name}"),
        ),
        (None, _) => finding(
            if required {
                Verdict::Fail
            } else {
                Verdict::Warn
            },
            "CRDs",
            format!("{name} is missing: {what}"),
        ),
    }
}

fn data<'a>(secret: &'a Secret, key: &str) -> Option<&'a ByteString> {
    secret.data.as_ref()?.get(key)
}

/// The issuer Secret (present, a certificate that has not expired, with its key) and the
/// trust bundle (present, certificates, one of which issued the issuer).
pub fn issuer_and_bundle(
    namespace: &str,
    secret: Option<&Secret>,
    bundle: Option<&ConfigMap>,
    now: SystemTime,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let issuer =
        secret.and_then(|s| Some((data(s, "issuer-cert.pem")?, data(s, "issuer-key.pem")?)));
    let issuer_der = issuer.and_then(|(cert, _)| CertificateDer::from_pem_slice(&cert.0).ok());
    let issuer_cert = issuer_der
        .as_ref()
        .and_then(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c));
    findings.push(match (secret, &issuer_cert) {
        (None, _) => finding(
            Verdict::Fail,
            "issuer",
            format!("Secret {namespace}/{ISSUER_SECRET} is missing: the CA cannot start; create it as deploy/README.md shows"),
        ),
        (Some(_), None) => finding(
            Verdict::Fail,
            "issuer",
            format!("Secret {namespace}/{ISSUER_SECRET} lacks a PEM issuer-cert.pem and issuer-key.pem"),
        ),
        (Some(_), Some(cert)) => {
            let not_after = cert.validity().not_after.timestamp();
            let now_unix = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let left = u64::try_from(not_after).unwrap_or(0).saturating_sub(now_unix);
            if left == 0 {
                finding(Verdict::Fail, "issuer", format!("the issuer certificate ({}) has EXPIRED: rotate it (docs/identity.md)", cert.subject()))
            } else {
                finding(Verdict::Ok, "issuer", format!("{} expires in {}", cert.subject(), human(left)))
            }
        }
    });
    let pem = bundle.and_then(|b| b.data.as_ref()?.get("trust-bundle.pem"));
    let roots: Vec<CertificateDer<'static>> = pem
        .map(|pem| {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .filter_map(Result::ok)
                .collect()
        })
        .unwrap_or_default();
    let subjects: Vec<String> = roots
        .iter()
        .filter_map(|der| {
            X509Certificate::from_der(der)
                .ok()
                .map(|(_, c)| c.subject().to_string())
        })
        .collect();
    findings.push(match (bundle, subjects.is_empty(), &issuer_cert) {
        (None, _, _) => finding(
            Verdict::Fail,
            "trust bundle",
            format!("ConfigMap {namespace}/{TRUST_BUNDLE} is missing: agents cannot verify each other; set trustBundle in the chart's values or create it"),
        ),
        (Some(_), true, _) => finding(
            Verdict::Fail,
            "trust bundle",
            format!("ConfigMap {namespace}/{TRUST_BUNDLE} holds no PEM certificate in trust-bundle.pem"),
        ),
        (Some(_), false, Some(cert)) if !subjects.contains(&cert.issuer().to_string()) => finding(
            Verdict::Fail,
            "trust bundle",
            format!("no certificate of the bundle issued the issuer (issued by {}): agents would refuse each other", cert.issuer()),
        ),
        (Some(_), false, _) => finding(
            Verdict::Ok,
            "trust bundle",
            format!("{} root certificate(s)", subjects.len()),
        ),
    });
    findings
}

fn ca_readiness(namespace: &str, pods: &[Pod]) -> Finding {
    let ready = pods
        .iter()
        .filter(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    if ready == 0 {
        finding(
            Verdict::Fail,
            "CA",
            format!(
                "no ready CA pod ({CA_SELECTOR} in {namespace}, {} found): agents get no certificates; kubectl -n {namespace} describe deployment nodemesh-ca",
                pods.len()
            ),
        )
    } else {
        finding(Verdict::Ok, "CA", format!("{ready} ready pod(s)"))
    }
}

/// The report as printed, failures first, and whether every check passed (warnings pass).
pub fn report(findings: &[Finding]) -> (String, bool) {
    let failed = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    let warned = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Warn)
        .count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "nodemesh check: {} checks, {failed} failed, {warned} warnings",
        findings.len()
    );
    let mut sorted: Vec<&Finding> = findings.iter().collect();
    sorted.sort_by_key(|f| match f.verdict {
        Verdict::Fail => 0,
        Verdict::Warn => 1,
        Verdict::Ok => 2,
    });
    for f in sorted {
        let verdict = match f.verdict {
            Verdict::Ok => "ok",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        let _ = writeln!(out, "  {verdict:<5} {:<18} {}", f.check, f.message);
    }
    (out, failed == 0)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{NodeStatus, NodeSystemInfo};

    use super::*;

    fn node(name: &str, kernel: &str) -> Node {
        Node {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                node_info: Some(NodeSystemInfo {
                    kernel_version: kernel.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_under_the_floor_fails_and_says_which() {
        let findings = kernels(&[
            node("new", "6.1.0-57-amd64"),
            node("old", "5.15.0-100-generic"),
        ]);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].verdict, Verdict::Fail);
        assert!(
            findings[0]
                .message
                .starts_with("node old runs kernel 5.15.0-100-generic")
        );
        let fine = kernels(&[node("new", "6.18.0")]);
        assert_eq!(fine[0].verdict, Verdict::Ok);
    }

    #[test]
    fn a_missing_issuer_and_bundle_fail() {
        let findings = issuer_and_bundle("nodemesh-system", None, None, SystemTime::now());
        assert!(
            findings.iter().all(|f| f.verdict == Verdict::Fail),
            "{findings:?}"
        );
        let (text, passed) = report(&findings);
        assert!(!passed);
        assert!(
            text.contains("Secret nodemesh-system/nodemesh-issuer is missing"),
            "{text}"
        );
    }
}
