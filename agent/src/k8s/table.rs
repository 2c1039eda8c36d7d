//! The small kinds a watch keeps whole (Namespaces, this node's Pods, HTTPRoutes,
//! AuthorizationPolicies): a table updated event by event, where a relist updates in place and
//! then drops what it did not mention.

use std::collections::{BTreeMap, HashSet};

use super::compact::NamespaceInfo;
use super::labels::InvalidNamespaceLabel;

#[derive(Debug)]
pub struct Table<K, V> {
    /// Each object with the relist that last mentioned it.
    entries: BTreeMap<K, (V, u64)>,
    epoch: u64,
}

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            epoch: 0,
        }
    }
}

impl<K: Ord + Clone, V: Clone> Table<K, V> {
    /// Adds or replaces `key`; None removes it.
    pub fn upsert(&mut self, key: K, value: Option<V>) {
        match value {
            Some(value) => {
                self.entries.insert(key, (value, self.epoch));
            }
            None => {
                self.entries.remove(&key);
            }
        }
    }

    /// Marks `key` as mentioned by the current relist, keeping its value.
    pub fn keep(&mut self, key: &K) {
        if let Some((_, epoch)) = self.entries.get_mut(key) {
            *epoch = self.epoch;
        }
    }

    pub fn begin_relist(&mut self) {
        self.epoch += 1;
    }

    /// The current relist's number.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn end_relist(&mut self) {
        let epoch = self.epoch;
        self.entries.retain(|_, (_, at)| *at == epoch);
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key).map(|(value, _)| value)
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn to_map(&self) -> BTreeMap<K, V> {
        self.entries
            .iter()
            .map(|(key, (value, _))| (key.clone(), value.clone()))
            .collect()
    }
}

/// Namespaces by name, keeping the last good version of one whose labels became invalid
/// (the error is reported, the namespace's mesh membership does not change by accident).
#[derive(Debug, Default)]
pub struct NamespaceTable {
    table: Table<String, NamespaceInfo>,
    /// Rejected labels by namespace, with the relist that last mentioned it.
    errors: BTreeMap<String, (String, u64)>,
}

impl NamespaceTable {
    pub fn upsert(
        &mut self,
        name: String,
        namespace: Option<Result<NamespaceInfo, InvalidNamespaceLabel>>,
    ) {
        match namespace {
            Some(Ok(info)) => {
                self.errors.remove(&name);
                self.table.upsert(name, Some(info));
            }
            Some(Err(error)) => {
                self.table.keep(&name);
                self.errors
                    .insert(name, (error.to_string(), self.table.epoch()));
            }
            None => {
                self.errors.remove(&name);
                self.table.upsert(name, None);
            }
        }
    }

    pub fn begin_relist(&mut self) {
        self.table.begin_relist();
    }

    pub fn end_relist(&mut self) {
        self.table.end_relist();
        let epoch = self.table.epoch();
        self.errors.retain(|_, (_, at)| *at == epoch);
    }

    pub fn to_map(&self) -> BTreeMap<String, NamespaceInfo> {
        self.table.to_map()
    }

    /// The namespaces labelled into the mesh.
    pub fn meshed(&self) -> HashSet<String> {
        self.table
            .entries
            .iter()
            .filter(|(_, (ns, _))| ns.meshed)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// One message per namespace whose current labels are rejected.
    pub fn errors(&self) -> Vec<String> {
        self.errors
            .iter()
            .map(|(name, (error, _))| {
                format!("Namespace {name} (API server): {error}; keeping its last good version")
            })
            .collect()
    }
}
