//! Cluster state from a directory of Kubernetes YAML manifests, watched for changes.
//!
//! Every `*.yaml`/`*.yml` file (dotfiles ignored, so writers can rename temporaries into
//! place) may hold several documents. Namespaces, Pods, Services, EndpointSlices, Gateway
//! API HTTPRoutes and GRPCRoutes and nodemesh AuthorizationPolicies are kept; other kinds
//! are ignored.
//! A file that fails to parse is reported with its path and position, and the objects it
//! held last time it parsed are kept: bad input never drops good state. Objects are held in
//! the same compact forms as the API watches keep (`compact.rs`), and each refresh feeds the
//! same indices.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::{
    compact::{self, LocalPod, NamespaceInfo, ServiceInfo, SliceInfo, WorkloadPod},
    intern::Interner,
    labels::{self, InvalidNamespaceLabel},
    objects::{AuthorizationPolicyObject, GrpcRouteObject, HttpRouteObject},
    snapshot::{ClusterIndices, ClusterSnapshot, Topology},
};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {document}: {source}")]
    Yaml {
        path: PathBuf,
        document: usize,
        source: serde_yaml::Error,
    },
    #[error("{path}: document {document}: {kind} field `{field}`: {source}")]
    Field {
        path: PathBuf,
        document: usize,
        kind: &'static str,
        field: String,
        source: serde_yaml::Error,
    },
    #[error("{path}: document {document}: {kind} without metadata.name")]
    MissingName {
        path: PathBuf,
        document: usize,
        kind: &'static str,
    },
    #[error("{path}: document {document}: Namespace {name}: {source}")]
    Label {
        path: PathBuf,
        document: usize,
        name: String,
        source: InvalidNamespaceLabel,
    },
    #[error("{path}: document {document}: {kind} {name} without metadata.namespace")]
    MissingNamespace {
        path: PathBuf,
        document: usize,
        kind: &'static str,
        name: String,
    },
    #[error("watching {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// One object of a manifest, as parsed.
#[derive(Clone, Debug)]
enum Manifest {
    /// Read through `compact::namespace_info` as it is parsed: a namespace whose labels are
    /// invalid rejects its file, whose last good objects stay.
    Namespace(NamespaceInfo),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    HttpRoute(Box<HttpRouteObject>),
    GrpcRoute(Box<GrpcRouteObject>),
    AuthorizationPolicy(Box<AuthorizationPolicyObject>),
    /// A Node: its name and zone and region labels.
    Node {
        name: String,
        zone: Option<String>,
        region: Option<String>,
    },
}

/// One object as the agent keeps it.
#[derive(Clone, Debug)]
enum Object {
    Namespace(NamespaceInfo),
    /// A pod: for the workload index when it can own a meshed address, and whole enough to
    /// enrol when it is on this node.
    Pod {
        key: String,
        workload: Option<WorkloadPod>,
        local: Option<Box<LocalPod>>,
    },
    Service(ServiceInfo),
    EndpointSlice(SliceInfo),
    HttpRoute(Box<HttpRouteObject>),
    GrpcRoute(Box<GrpcRouteObject>),
    AuthorizationPolicy(Box<AuthorizationPolicyObject>),
    /// A Node's zone and region (this node's say where it is; all say which region each
    /// zone is in).
    Node {
        local: bool,
        zone: Option<std::sync::Arc<str>>,
        region: Option<std::sync::Arc<str>>,
    },
}

#[derive(Deserialize)]
struct TypeMeta {
    #[serde(default)]
    kind: String,
    #[serde(default, rename = "apiVersion")]
    api_version: String,
}

/// Reads the directory again on each `refresh`, keeping the last good objects of bad files.
pub struct ClusterStateDir {
    dir: PathBuf,
    /// This node: its pods are kept whole enough to enrol.
    node: String,
    files: BTreeMap<PathBuf, Vec<Object>>,
    strings: Interner,
}

impl ClusterStateDir {
    pub fn new(dir: &Path, node: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            node: node.to_owned(),
            files: BTreeMap::new(),
            strings: Interner::default(),
        }
    }

    /// Re-reads every manifest and brings `indices` in line with it; returns the small kinds
    /// and the errors of files that could not be read (whose previous contents stay).
    pub fn refresh(&mut self, indices: &ClusterIndices) -> (ClusterSnapshot, Vec<ManifestError>) {
        let mut errors = Vec::new();
        match manifest_paths(&self.dir) {
            Ok(paths) => {
                self.files.retain(|path, _| paths.contains(path));
                for path in paths {
                    match parse_file(&path) {
                        Ok(manifests) => {
                            let objects = manifests
                                .into_iter()
                                .filter_map(|m| self.compact(m))
                                .collect();
                            self.files.insert(path, objects);
                        }
                        Err(error) => errors.push(error),
                    }
                }
            }
            Err(error) => errors.push(error),
        }
        (self.publish(indices), errors)
    }

    fn compact(&mut self, manifest: Manifest) -> Option<Object> {
        Some(match manifest {
            Manifest::Namespace(ns) => Object::Namespace(ns),
            Manifest::Pod(pod) => {
                let here = pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
                    == Some(self.node.as_str());
                Object::Pod {
                    key: compact::object_key(&pod.metadata)?,
                    workload: compact::workload_pod(&pod, &mut self.strings),
                    local: here
                        .then(|| compact::local_pod(&pod).map(Box::new))
                        .flatten(),
                }
            }
            Manifest::Service(service) => {
                Object::Service(compact::service_info(&service, &mut self.strings)?)
            }
            Manifest::EndpointSlice(slice) => {
                Object::EndpointSlice(compact::slice_info(&slice, &mut self.strings)?)
            }
            Manifest::HttpRoute(route) => Object::HttpRoute(route),
            Manifest::GrpcRoute(route) => Object::GrpcRoute(route),
            Manifest::AuthorizationPolicy(policy) => Object::AuthorizationPolicy(policy),
            Manifest::Node { name, zone, region } => Object::Node {
                local: name == self.node,
                zone: zone.map(|z| self.strings.intern(&z)),
                region: region.map(|r| self.strings.intern(&r)),
            },
        })
    }

    /// The small kinds, and the indices relisted from every file's objects.
    fn publish(&self, indices: &ClusterIndices) -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot::default();
        let mut workloads = indices.workloads.write().unwrap_or_else(|p| p.into_inner());
        let mut services = indices.services.write().unwrap_or_else(|p| p.into_inner());
        let mut topology = Topology::new(&self.node);
        workloads.begin_relist();
        services.begin_service_relist();
        services.begin_slice_relist();
        for object in self.files.values().flatten() {
            match object {
                Object::Namespace(ns) => {
                    snapshot.namespaces.insert(ns.name.clone(), ns.clone());
                }
                Object::Pod {
                    key,
                    workload,
                    local,
                } => {
                    workloads.upsert(key, workload.clone());
                    if let Some(local) = local {
                        snapshot.local_pods.insert(key.clone(), (**local).clone());
                    }
                }
                Object::Service(service) => {
                    services.upsert_service(&service.key.clone(), Some(service.clone()));
                }
                Object::EndpointSlice(slice) => {
                    services.upsert_slice(&slice.key.clone(), Some(slice.clone()));
                }
                Object::HttpRoute(route) => {
                    snapshot
                        .http_routes
                        .insert(namespaced_key(&route.metadata), (**route).clone());
                }
                Object::GrpcRoute(route) => {
                    snapshot
                        .grpc_routes
                        .insert(namespaced_key(&route.metadata), (**route).clone());
                }
                Object::AuthorizationPolicy(policy) => {
                    snapshot
                        .authorization_policies
                        .insert(namespaced_key(&policy.metadata), (**policy).clone());
                }
                Object::Node {
                    local,
                    zone,
                    region,
                } => topology.observe(*local, zone.clone(), region.clone()),
            }
        }
        workloads.end_relist();
        services.end_service_relist();
        services.end_slice_relist();
        services.set_topology(topology);
        workloads.set_meshed_namespaces(
            snapshot
                .namespaces
                .values()
                .filter(|ns| ns.meshed)
                .map(|ns| ns.name.clone())
                .collect(),
        );
        snapshot
    }

    /// Sends `()` on the returned channel whenever something in the directory changes.
    /// The watcher lives as long as the returned guard.
    pub fn watch(&self) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>), ManifestError> {
        let (tx, rx) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| is_change(&e)) {
                    // A full channel already holds a pending wake-up: nothing is lost.
                    let _ = tx.try_send(());
                }
            })
            .map_err(|source| ManifestError::Watch {
                path: self.dir.clone(),
                source,
            })?;
        watcher
            .watch(&self.dir, RecursiveMode::NonRecursive)
            .map_err(|source| ManifestError::Watch {
                path: self.dir.clone(),
                source,
            })?;
        Ok((watcher, rx))
    }
}

/// Whether a directory event can change the cluster state. Reads cannot, and the agent's own
/// reads produce them: reacting to those re-read the directory in a busy loop. A file closed
/// after writing (inotify's IN_CLOSE_WRITE, reported as an access) is a change.
fn is_change(event: &notify::Event) -> bool {
    use notify::{
        EventKind,
        event::{AccessKind, AccessMode},
    };
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Parses the text of one manifest file (named `path` in errors); returns how many objects
/// the agent would keep.
pub fn parse_text(path: &Path, text: &str) -> Result<usize, ManifestError> {
    parse_manifests(path, text).map(|manifests| manifests.len())
}

/// The pod `namespace/name` as the directory holds it, whole (the CA reads its node, service
/// account, UID and state); files that do not parse are skipped.
pub fn find_pod(dir: &Path, namespace: &str, name: &str) -> Option<Pod> {
    find_manifest(dir, |manifest| match manifest {
        Manifest::Pod(pod)
            if pod.metadata.namespace.as_deref() == Some(namespace)
                && pod.metadata.name.as_deref() == Some(name) =>
        {
            Some(*pod)
        }
        _ => None,
    })
}

/// Whether the directory holds the namespace `name` and it is in the mesh, for the CA: the
/// namespace is parsed into its compact form (its labels validated). Files that do not parse
/// are skipped.
pub fn namespace_meshed(dir: &Path, name: &str) -> bool {
    find_manifest(dir, |manifest| match manifest {
        Manifest::Namespace(namespace) if namespace.name.as_str() == name => Some(namespace.meshed),
        _ => None,
    })
    .unwrap_or(false)
}

fn find_manifest<T>(dir: &Path, wanted: impl FnMut(Manifest) -> Option<T>) -> Option<T> {
    manifest_paths(dir)
        .ok()?
        .iter()
        .filter_map(|path| parse_file(path).ok())
        .flatten()
        .find_map(wanted)
}

fn manifest_paths(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                && path.is_file()
        })
        .collect();
    paths.sort();
    Ok(paths)
}

fn parse_file(path: &Path) -> Result<Vec<Manifest>, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_manifests(path, &text)
}

/// Parses every document of one manifest file.
fn parse_manifests(path: &Path, text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let document_number = index + 1;
        let yaml_error = |source| ManifestError::Yaml {
            path: path.to_owned(),
            document: document_number,
            source,
        };
        let value = serde_yaml::Value::deserialize(document).map_err(yaml_error)?;
        if value.is_null() {
            continue;
        }
        let meta: TypeMeta = serde_yaml::from_value(value.clone()).map_err(yaml_error)?;
        match meta.kind.as_str() {
            "Namespace" => {
                let ns: Namespace = typed(path, document_number, "Namespace", value)?;
                let info = compact::namespace_info(&ns).ok_or(ManifestError::MissingName {
                    path: path.to_owned(),
                    document: document_number,
                    kind: "Namespace",
                })?;
                let info = info.map_err(|source| ManifestError::Label {
                    path: path.to_owned(),
                    document: document_number,
                    name: ns.metadata.name.clone().unwrap_or_default(),
                    source,
                })?;
                objects.push(Manifest::Namespace(info));
            }
            "Pod" => objects.push(Manifest::Pod(Box::new(namespaced(
                path,
                document_number,
                "Pod",
                value,
                |p: &Pod| &p.metadata,
            )?))),
            "Service" => objects.push(Manifest::Service(Box::new(namespaced(
                path,
                document_number,
                "Service",
                value,
                |s: &Service| &s.metadata,
            )?))),
            "EndpointSlice" => objects.push(Manifest::EndpointSlice(Box::new(namespaced(
                path,
                document_number,
                "EndpointSlice",
                value,
                |s: &EndpointSlice| &s.metadata,
            )?))),
            // Only nodemesh's own: Istio has a kind of the same name.
            "AuthorizationPolicy" if meta.api_version.starts_with("nodemesh.io/") => {
                objects.push(Manifest::AuthorizationPolicy(Box::new(namespaced(
                    path,
                    document_number,
                    "AuthorizationPolicy",
                    value,
                    |p: &AuthorizationPolicyObject| &p.metadata,
                )?)))
            }
            "HTTPRoute" => objects.push(Manifest::HttpRoute(Box::new(namespaced(
                path,
                document_number,
                "HTTPRoute",
                value,
                |r: &HttpRouteObject| &r.metadata,
            )?))),
            "Node" => {
                let node: k8s_openapi::api::core::v1::Node =
                    typed(path, document_number, "Node", value)?;
                let label = |key| labels::label(&node.metadata, key).map(str::to_owned);
                objects.push(Manifest::Node {
                    name: node.metadata.name.clone().unwrap_or_default(),
                    zone: label(labels::ZONE_LABEL),
                    region: label(labels::REGION_LABEL),
                });
            }
            "GRPCRoute" => objects.push(Manifest::GrpcRoute(Box::new(namespaced(
                path,
                document_number,
                "GRPCRoute",
                value,
                |r: &GrpcRouteObject| &r.metadata,
            )?))),
            other => tracing::debug!(path = %path.display(), kind = other, "ignoring manifest"),
        }
    }
    Ok(objects)
}

/// Deserialises a namespaced object that must have a name and a namespace.
fn namespaced<T: serde::de::DeserializeOwned>(
    path: &Path,
    document: usize,
    kind: &'static str,
    value: serde_yaml::Value,
    metadata: impl Fn(&T) -> &ObjectMeta,
) -> Result<T, ManifestError> {
    let object: T = typed(path, document, kind, value)?;
    let meta = metadata(&object);
    let Some(name) = meta.name.clone() else {
        return Err(ManifestError::MissingName {
            path: path.to_owned(),
            document,
            kind,
        });
    };
    if meta.namespace.is_none() {
        return Err(ManifestError::MissingNamespace {
            path: path.to_owned(),
            document,
            kind,
            name,
        });
    }
    Ok(object)
}

fn namespaced_key(meta: &ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// Deserialises one object, naming the offending field on error.
fn typed<T: serde::de::DeserializeOwned>(
    path: &Path,
    document: usize,
    kind: &'static str,
    value: serde_yaml::Value,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|error| ManifestError::Field {
        path: path.to_owned(),
        document,
        kind,
        field: error.path().to_string(),
        source: error.into_inner(),
    })
}

#[cfg(test)]
mod tests;
