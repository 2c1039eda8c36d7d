//! A list by address of what is on this node: the enrolled destination pods
//! (`context::LocalPods`), where the outbound side looks a destination up to hand a
//! connection between two pods of this node to the inbound side in process (`admission`),
//! without TLS or HTTP/2 between the two halves of the same agent.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, RwLock},
};

use crate::proxy::listener::canonical;

/// Values listed under addresses while their registrations live.
pub struct ByAddress<V> {
    listed: RwLock<HashMap<IpAddr, Arc<V>>>,
}

impl<V> Default for ByAddress<V> {
    fn default() -> Self {
        Self {
            listed: RwLock::default(),
        }
    }
}

impl<V> ByAddress<V> {
    /// Lists `value` under `addresses` until the returned registration is dropped (for a
    /// pod: it is un-enrolled, or its enrolment failed half-way). A later registration
    /// under the same address replaces it there.
    pub fn register(self: &Arc<Self>, addresses: &[IpAddr], value: &Arc<V>) -> Registration<V> {
        let addresses: Vec<IpAddr> = addresses.iter().map(|ip| canonical(*ip)).collect();
        let mut listed = self.listed.write().unwrap_or_else(|p| p.into_inner());
        for ip in &addresses {
            listed.insert(*ip, Arc::clone(value));
        }
        Registration {
            list: Arc::clone(self),
            addresses,
            value: Arc::clone(value),
        }
    }

    /// What is listed under `ip`, if anything.
    pub fn at(&self, ip: IpAddr) -> Option<Arc<V>> {
        let listed = self.listed.read().unwrap_or_else(|p| p.into_inner());
        listed.get(&canonical(ip)).cloned()
    }
}

/// A value listed in `ByAddress`; dropping it takes the value off its addresses, except
/// where another has been listed since.
pub struct Registration<V> {
    list: Arc<ByAddress<V>>,
    addresses: Vec<IpAddr>,
    value: Arc<V>,
}

impl<V> Drop for Registration<V> {
    fn drop(&mut self) {
        let mut listed = (self.list.listed.write()).unwrap_or_else(|p| p.into_inner());
        for ip in &self.addresses {
            if listed.get(ip).is_some_and(|v| Arc::ptr_eq(v, &self.value)) {
                listed.remove(ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listed_while_registered_and_not_after() {
        let list = Arc::new(ByAddress::default());
        let pod = Arc::new("pod-a");
        let registration = list.register(&[ip("10.0.0.1"), ip("fd00::1")], &pod);
        assert_eq!(list.at(ip("10.0.0.1")).as_deref(), Some(&"pod-a"));
        assert_eq!(list.at(ip("fd00::1")).as_deref(), Some(&"pod-a"));
        assert_eq!(
            list.at(ip("::ffff:10.0.0.1")).as_deref(),
            Some(&"pod-a"),
            "a v4-mapped address is its IPv4 address"
        );
        assert!(list.at(ip("10.0.0.2")).is_none());
        drop(registration);
        assert!(list.at(ip("10.0.0.1")).is_none());
        assert!(list.at(ip("fd00::1")).is_none());
    }

    #[test]
    fn a_stale_registration_does_not_take_off_its_successor() {
        let list = Arc::new(ByAddress::default());
        let old = list.register(&[ip("10.0.0.1")], &Arc::new("old"));
        let new = list.register(&[ip("10.0.0.1")], &Arc::new("new"));
        drop(old);
        assert_eq!(list.at(ip("10.0.0.1")).as_deref(), Some(&"new"));
        drop(new);
        assert!(list.at(ip("10.0.0.1")).is_none());
    }
}
