//! Established connections under policy changes. A connection decided once (an L4 tunnel, a
//! relayed non-HTTP stream, an upgraded HTTP connection, plaintext) is decided again every
//! time the authorization policies change (and, for plaintext, the namespace's peer
//! authentication), and is reset when the new ones deny it, as ztunnel does: a revoked
//! principal keeps nothing it was given before. HTTP requests need none of this: each is
//! decided with the policies in force when it arrives.

use std::sync::Arc;

use tokio::sync::watch;

use crate::{
    identity::spiffe::SpiffeId,
    k8s::labels::PeerAuthentication,
    state::{
        authorization::{Decision, Policy, decide_stream},
        node::PodPolicies,
    },
};

/// Resolves with what denies the connection (a policy, or the mode) once a change of the
/// pod's policies, or of its peer authentication when `mode` is given, makes `decide` deny.
pub async fn withdrawn(
    mut policies: PodPolicies,
    mut mode: Option<watch::Receiver<PeerAuthentication>>,
    decide: impl Fn(&[Arc<Policy>]) -> Decision,
) -> String {
    loop {
        match &mut mode {
            Some(mode) => tokio::select! {
                () = policies.changed() => {}
                changed = mode.changed() => {
                    if changed.is_err() {
                        // The pod is gone; its connections end with its listeners' tasks.
                        std::future::pending::<()>().await;
                    }
                }
            },
            None => policies.changed().await,
        }
        if let Decision::Deny(by) = decide(&policies.current()) {
            return by;
        }
    }
}

/// `withdrawn` for a meshed `peer`'s stream to `port` as a whole (`decide_stream`): what
/// denies it once the pod's policies change to.
pub async fn stream_withdrawn(policies: PodPolicies, peer: &SpiffeId, port: u16) -> String {
    withdrawn(policies, None, |current: &[Arc<Policy>]| {
        decide_stream(current, peer, port)
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        k8s::objects::AuthorizationPolicyObject,
        state::{
            authorization::{AuthorizationIndex, RequestAttributes, decide},
            node::NodeState,
        },
    };

    /// A node state whose only content is the policy `policy`, if any.
    fn index_with(policy: Option<serde_json::Value>) -> Arc<NodeState> {
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "mesh", "name": "server", "labels": {"app": "server"}},
        }))
        .expect("pod");
        let pod = crate::k8s::compact::local_pod(&pod).expect("a local pod");
        let mut policies = BTreeMap::new();
        if let Some(spec) = policy {
            let object: AuthorizationPolicyObject = serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "mesh", "name": "deny-all"},
                "spec": spec,
            }))
            .expect("policy");
            policies.insert(("mesh".to_owned(), "deny-all".to_owned()), object);
        }
        let (index, errors) = AuthorizationIndex::build(
            &policies,
            std::iter::once(&pod),
            &AuthorizationIndex::default(),
        );
        assert!(errors.is_empty(), "{errors:?}");
        Arc::new(NodeState {
            authorization: Arc::new(index),
            ..NodeState::default()
        })
    }

    #[tokio::test]
    async fn a_policy_change_that_denies_the_connection_withdraws_it() {
        let (index, receiver) = watch::channel(index_with(None));
        let policies = PodPolicies::new(receiver, "mesh/server");
        let plaintext = |current: &[Arc<Policy>]| {
            decide(
                current,
                &RequestAttributes {
                    source: None,
                    port: 8080,
                    http: None,
                },
            )
        };
        let watcher = tokio::spawn(withdrawn(policies, None, plaintext));
        // A change that still allows it: the connection carries on.
        index.send_replace(index_with(None));
        tokio::task::yield_now().await;
        assert!(!watcher.is_finished());
        index.send_replace(index_with(Some(serde_json::json!({
            "action": "DENY", "rules": [{}],
        }))));
        let by = watcher.await.expect("watcher");
        assert_eq!(by, "mesh/deny-all");
    }

    #[tokio::test]
    async fn turning_strict_withdraws_plaintext() {
        let (_index, receiver) = watch::channel(index_with(None));
        let (mode, mode_receiver) = watch::channel(PeerAuthentication::Permissive);
        let policies = PodPolicies::new(receiver, "mesh/server");
        let strict = mode_receiver.clone();
        let watcher = tokio::spawn(withdrawn(policies, Some(mode_receiver), move |_| {
            if *strict.borrow() == PeerAuthentication::Strict {
                Decision::Deny("STRICT".into())
            } else {
                Decision::Allow
            }
        }));
        mode.send_replace(PeerAuthentication::Strict);
        assert_eq!(watcher.await.expect("watcher"), "STRICT");
    }
}
