//! Where each watch's events go: every object is transformed into its compact form as it
//! arrives (`compact.rs`) and applied to the index or table of its kind.

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::Resource;

use super::{
    compact::{self, LocalPod},
    intern::Interner,
    snapshot::{ServiceStore, WorkloadStore},
    table::{NamespaceTable, Table},
    watch::Sink,
};

fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every pod of the cluster, into the workload index.
pub struct WorkloadSink {
    pub index: Arc<RwLock<dyn WorkloadStore>>,
    pub strings: Interner,
}

impl Sink<Pod> for WorkloadSink {
    fn begin_relist(&mut self) {
        write(&self.index).begin_relist();
    }
    fn apply(&mut self, pod: Pod) {
        if let Some(key) = compact::object_key(&pod.metadata) {
            let compact = compact::workload_pod(&pod, &mut self.strings);
            write(&self.index).upsert(&key, compact);
        }
    }
    fn delete(&mut self, pod: Pod) {
        if let Some(key) = compact::object_key(&pod.metadata) {
            write(&self.index).upsert(&key, None);
        }
    }
    fn end_relist(&mut self) {
        write(&self.index).end_relist();
    }
}

/// This node's pods, whole enough for enrolment.
pub struct LocalPodSink {
    pub table: Arc<Mutex<Table<String, LocalPod>>>,
}

impl Sink<Pod> for LocalPodSink {
    fn begin_relist(&mut self) {
        lock(&self.table).begin_relist();
    }
    fn apply(&mut self, pod: Pod) {
        if let Some(key) = compact::object_key(&pod.metadata) {
            lock(&self.table).upsert(key, compact::local_pod(&pod));
        }
    }
    fn delete(&mut self, pod: Pod) {
        if let Some(key) = compact::object_key(&pod.metadata) {
            lock(&self.table).upsert(key, None);
        }
    }
    fn end_relist(&mut self) {
        lock(&self.table).end_relist();
    }
}

/// Namespaces, whose mesh label the workload index also reads.
pub struct NamespaceSink {
    pub table: Arc<Mutex<NamespaceTable>>,
    pub workloads: Arc<RwLock<dyn WorkloadStore>>,
    /// Inside a list: the index hears of the namespaces once, at its end.
    pub listing: bool,
}

impl NamespaceSink {
    fn publish(&self) {
        let meshed = lock(&self.table).meshed();
        write(&self.workloads).set_meshed_namespaces(meshed);
    }
}

impl Sink<Namespace> for NamespaceSink {
    fn begin_relist(&mut self) {
        self.listing = true;
        lock(&self.table).begin_relist();
    }
    fn apply(&mut self, namespace: Namespace) {
        let Some(name) = namespace.metadata.name.clone() else {
            return;
        };
        lock(&self.table).upsert(name, compact::namespace_info(&namespace));
        if !self.listing {
            self.publish();
        }
    }
    fn delete(&mut self, namespace: Namespace) {
        if let Some(name) = namespace.metadata.name.clone() {
            lock(&self.table).upsert(name, None);
            self.publish();
        }
    }
    fn end_relist(&mut self) {
        lock(&self.table).end_relist();
        self.listing = false;
        self.publish();
    }
}

/// Services, into the Service index.
pub struct ServiceSink {
    pub index: Arc<RwLock<dyn ServiceStore>>,
    pub strings: Interner,
}

impl Sink<Service> for ServiceSink {
    fn begin_relist(&mut self) {
        write(&self.index).begin_service_relist();
    }
    fn apply(&mut self, service: Service) {
        if let Some(info) = compact::service_info(&service, &mut self.strings) {
            let key = Arc::clone(&info.key);
            write(&self.index).upsert_service(&key, Some(info));
        }
    }
    fn delete(&mut self, service: Service) {
        if let Some(key) = compact::object_key(&service.metadata) {
            write(&self.index).upsert_service(&key, None);
        }
    }
    fn end_relist(&mut self) {
        write(&self.index).end_service_relist();
    }
}

/// EndpointSlices, into the Service index.
pub struct SliceSink {
    pub index: Arc<RwLock<dyn ServiceStore>>,
    pub strings: Interner,
}

impl Sink<EndpointSlice> for SliceSink {
    fn begin_relist(&mut self) {
        write(&self.index).begin_slice_relist();
    }
    fn apply(&mut self, slice: EndpointSlice) {
        if let Some(info) = compact::slice_info(&slice, &mut self.strings) {
            let key = Arc::clone(&info.key);
            write(&self.index).upsert_slice(&key, Some(info));
        }
    }
    fn delete(&mut self, slice: EndpointSlice) {
        if let Some(key) = compact::object_key(&slice.metadata) {
            write(&self.index).upsert_slice(&key, None);
        }
    }
    fn end_relist(&mut self) {
        write(&self.index).end_slice_relist();
    }
}

/// Objects kept whole by (namespace, name): HTTPRoutes and AuthorizationPolicies, whose specs
/// the agent converts (and reports errors in) on each pass.
pub struct ObjectSink<K> {
    pub table: Arc<Mutex<Table<(String, String), K>>>,
}

fn namespaced_name<K: Resource>(object: &K) -> Option<(String, String)> {
    let meta = object.meta();
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

impl<K: Resource + Clone + Send + 'static> Sink<K> for ObjectSink<K> {
    fn begin_relist(&mut self) {
        lock(&self.table).begin_relist();
    }
    fn apply(&mut self, mut object: K) {
        let meta = object.meta_mut();
        meta.managed_fields = None;
        if let Some(annotations) = &mut meta.annotations {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
        if let Some(key) = namespaced_name(&object) {
            lock(&self.table).upsert(key, Some(object));
        }
    }
    fn delete(&mut self, object: K) {
        if let Some(key) = namespaced_name(&object) {
            lock(&self.table).upsert(key, None);
        }
    }
    fn end_relist(&mut self) {
        lock(&self.table).end_relist();
    }
}
