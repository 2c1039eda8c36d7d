//! Shared strings. Namespaces, service accounts, node names, workload names and port names
//! repeat across tens of thousands of objects; each distinct one is stored once. (A dozen
//! lines of our own: the interning crates are global or leak what they intern, and a watch
//! must be able to forget the names of namespaces that are gone.)

use std::{collections::HashSet, sync::Arc};

/// Below this many distinct strings the interner never sweeps.
const MIN_SWEEP: usize = 1024;

/// One owner's set of shared strings; strings nobody else holds are dropped as it grows.
#[derive(Debug)]
pub struct Interner {
    strings: HashSet<Arc<str>>,
    /// Sweep when the set reaches this size (twice what survived the last sweep).
    sweep_at: usize,
}

impl Default for Interner {
    fn default() -> Self {
        Self {
            strings: HashSet::new(),
            sweep_at: MIN_SWEEP,
        }
    }
}

impl Interner {
    /// The shared copy of `text`.
    pub fn intern(&mut self, text: &str) -> Arc<str> {
        if let Some(shared) = self.strings.get(text) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = Arc::from(text);
        self.strings.insert(Arc::clone(&shared));
        if self.strings.len() >= self.sweep_at {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.sweep_at = (self.strings.len() * 2).max(MIN_SWEEP);
        }
        shared
    }

    /// How many distinct strings are held.
    pub fn len(&self) -> usize {
        self.strings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.strings.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_strings_share_one_allocation_and_unused_ones_are_swept() {
        let mut interner = Interner::default();
        let a = interner.intern("shop");
        let b = interner.intern("shop");
        assert!(Arc::ptr_eq(&a, &b));
        for n in 0..MIN_SWEEP {
            drop(interner.intern(&format!("gone-{n}")));
        }
        assert!(
            interner.len() < MIN_SWEEP,
            "strings only the interner held were dropped"
        );
        assert!(Arc::ptr_eq(&a, &interner.intern("shop")), "held ones stay");
    }
}
