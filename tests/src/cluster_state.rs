//! The cluster-state directory the agent reads: one Kubernetes object per YAML file.
//!
//! Files are `namespace-<name>.yaml` and `pod-<namespace>-<name>.yaml`, each written to
//! `.<file>.tmp` first and renamed into place, so the agent (which ignores dotfiles) never
//! reads half a file.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerState, ContainerStateRunning, ContainerStatus, HTTPGetAction,
            HostIP, Namespace, Pod as K8sPod, PodCondition, PodIP, PodSpec as K8sPodSpec,
            PodStatus, Probe, Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use serde::Serialize;

use crate::{
    error::{IoContext, Result, TestbedError},
    pod::Pod,
};

/// The image every testbed pod claims to run.
pub const WORKLOAD_IMAGE: &str = "nodemesh.io/testbed-workload";
const WORKLOAD_IMAGE_ID: &str = "nodemesh.io/testbed-workload@sha256:6e6f64656d6573682d746573746265642d776f726b6c6f61642d696d6167652e";
/// The label the API server puts on every namespace.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The file name of a namespace's manifest.
pub fn namespace_file(name: &str) -> String {
    format!("namespace-{name}.yaml")
}

/// The file name of a pod's manifest.
pub fn pod_file(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

/// A Namespace object as the API server would return it.
pub fn namespace_object(name: &str, labels: &BTreeMap<String, String>) -> Namespace {
    let mut labels = labels.clone();
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A running BestEffort Pod object as the API server would return it.
pub fn pod_object(pod: &Pod) -> K8sPod {
    let container = "app".to_owned();
    K8sPod {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            uid: Some(pod.uid.clone()),
            labels: Some(pod.labels.clone()),
            ..Default::default()
        },
        spec: Some(K8sPodSpec {
            node_name: Some(pod.node.clone()),
            service_account_name: Some(pod.service_account.clone()),
            containers: vec![Container {
                name: container.clone(),
                image: Some(WORKLOAD_IMAGE.to_owned()),
                readiness_probe: pod.http_probe.as_ref().map(|(port, path)| Probe {
                    http_get: Some(HTTPGetAction {
                        path: Some(path.clone()),
                        port: IntOrString::Int(i32::from(*port)),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ip: Some(pod.ipv4.to_string()),
            pod_ips: Some(vec![
                PodIP {
                    ip: pod.ipv4.to_string(),
                },
                PodIP {
                    ip: pod.ipv6.to_string(),
                },
            ]),
            host_ip: Some(pod.host_ip().to_string()),
            host_ips: Some(vec![HostIP {
                ip: pod.host_ip().to_string(),
            }]),
            qos_class: Some("BestEffort".to_owned()),
            conditions: Some(
                ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
                    .into_iter()
                    .map(|kind| PodCondition {
                        type_: kind.to_owned(),
                        status: "True".to_owned(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            container_statuses: Some(vec![ContainerStatus {
                name: container,
                container_id: Some(format!("containerd://{}", pod.container_id)),
                ready: true,
                started: Some(true),
                restart_count: 0,
                image: WORKLOAD_IMAGE.to_owned(),
                image_id: WORKLOAD_IMAGE_ID.to_owned(),
                state: Some(ContainerState {
                    running: Some(ContainerStateRunning::default()),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// Serialises `object` to YAML and writes it to `dir/file` atomically.
fn write_object<T: Serialize>(dir: &Path, file: &str, object: &T) -> Result<PathBuf> {
    let yaml = serde_yaml::to_string(object).map_err(|source| TestbedError::Yaml {
        what: file.to_owned(),
        source,
    })?;
    let path = dir.join(file);
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).io_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)
        .io_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(path)
}

/// Writes (or rewrites) a namespace's manifest.
pub(crate) fn write_namespace(
    dir: &Path,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<PathBuf> {
    write_object(dir, &namespace_file(name), &namespace_object(name, labels))
}

/// Writes (or rewrites) a pod's manifest.
pub(crate) fn write_pod(dir: &Path, pod: &Pod) -> Result<PathBuf> {
    write_object(dir, &pod_file(&pod.namespace, &pod.name), &pod_object(pod))
}

/// A ClusterIP Service in `namespace` with one TCP port (`port` → the pods' `target_port`,
/// a port name), as the API server would return it.
pub fn service_object(
    namespace: &str,
    name: &str,
    cluster_ip: &str,
    port: u16,
    target_port: &str,
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.to_owned()),
            cluster_ips: Some(vec![cluster_ip.to_owned()]),
            ports: Some(vec![ServicePort {
                name: Some(target_port.to_owned()),
                port: i32::from(port),
                protocol: Some("TCP".into()),
                target_port: Some(IntOrString::String(target_port.to_owned())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Sets the `zone` of `slice`'s endpoints in order, as the EndpointSlice controller copies
/// it from each endpoint's Node (None: no zone).
pub fn set_endpoint_zones(slice: &mut EndpointSlice, zones: &[Option<&str>]) {
    for (endpoint, zone) in slice.endpoints.iter_mut().flatten().zip(zones) {
        endpoint.zone = zone.map(str::to_owned);
    }
}

/// The IPv4 EndpointSlice the endpoint controller would write for `service`: the named port
/// resolves to `port` on every pod; `(pod, terminating)` pairs give each endpoint's state.
pub fn endpoint_slice_object(
    service: &str,
    port_name: &str,
    port: u16,
    endpoints: &[(&Pod, bool)],
) -> EndpointSlice {
    let namespace = endpoints
        .first()
        .map(|(pod, _)| pod.namespace.clone())
        .unwrap_or_default();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-ipv4")),
            namespace: Some(namespace),
            labels: Some(BTreeMap::from([(
                "kubernetes.io/service-name".to_owned(),
                service.to_owned(),
            )])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        ports: Some(vec![EndpointPort {
            name: Some(port_name.to_owned()),
            port: Some(i32::from(port)),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(pod, terminating)| Endpoint {
                    addresses: vec![pod.ipv4().to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(!terminating),
                        serving: Some(true),
                        terminating: Some(*terminating),
                    }),
                    node_name: Some(pod.node().to_owned()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// Writes (or rewrites) any object under `file` (named like `service-<ns>-<name>.yaml`).
pub(crate) fn write_any<T: Serialize>(dir: &Path, file: &str, object: &T) -> Result<PathBuf> {
    write_object(dir, file, object)
}

/// Deletes a pod's manifest (no error if it is already gone).
pub(crate) fn delete_pod(dir: &Path, namespace: &str, name: &str) -> Result<()> {
    let path = dir.join(pod_file(namespace, name));
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).io_context(|| format!("removing {}", path.display())),
    }
}
