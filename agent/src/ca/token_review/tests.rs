//! The CA's authentication and lookups against a real kube-apiserver and etcd (a loopback
//! control plane of its own, from /var/cache/nodemesh/testenv/bin) with tokens the API
//! server issues through the TokenRequest API, bound to pods on a Node, as the kubelet
//! projects them. The API server writes an audit log of TokenReviews, so the tests count the
//! reviews the CA really made. The CA acts as a ServiceAccount of its own with the chart's
//! CA permissions. Each test has its own namespaces, node and CA account.
//!
//! `double` stands in for the two answers no API server here can be made to give.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Node, Pod, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    Client,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use nodemesh_testbed::ControlPlane;
use serde_json::{Value, json};

use super::*;
use crate::{
    ca::{
        auth::{Authenticator, PodDirectory},
        issuer::{WorkloadIssuer, init_ca},
        server::{CaError, CertificateAuthority},
    },
    identity::ca_client::SignRequest,
};

mod double;

const AUDIENCE: &str = "nodemesh";

/// The loopback control plane, auditing TokenReviews at the start of each request (written
/// before the request is handled: the log backend blocks).
struct AuditedPlane {
    plane: ControlPlane,
    audit_log: PathBuf,
}

fn plane() -> &'static AuditedPlane {
    static PLANE: OnceLock<AuditedPlane> = OnceLock::new();
    PLANE.get_or_init(|| {
        // Named like the control plane's own directories, so that it is swept with them once
        // this process is gone.
        let dir = Path::new("/dev/shm").join(format!("nodemesh-cp-{}-audit", std::process::id()));
        std::fs::create_dir_all(&dir).expect("audit directory");
        let policy = dir.join("policy.yaml");
        std::fs::write(
            &policy,
            "apiVersion: audit.k8s.io/v1\nkind: Policy\n\
             omitStages: [ResponseStarted, ResponseComplete, Panic]\n\
             rules:\n\
             - level: Metadata\n  resources: [{group: authentication.k8s.io, resources: [tokenreviews]}]\n\
             - level: None\n",
        )
        .expect("audit policy");
        let audit_log = dir.join("audit.log");
        let plane = ControlPlane::loopback(&[
            &format!("--audit-policy-file={}", policy.display()),
            &format!("--audit-log-path={}", audit_log.display()),
        ])
        .expect(
            "a loopback control plane (scripts/setup.sh builds it into /var/cache/nodemesh/testenv)",
        );
        AuditedPlane { plane, audit_log }
    })
}

/// Runs an async test on a runtime of its own, the control plane started first (its calls
/// block).
fn run(test: impl std::future::Future<Output = ()>) {
    plane();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(test);
}

async fn client_with_token_file(token_file: &Path) -> Client {
    let mut kubeconfig =
        Kubeconfig::read_from(plane().plane.admin_kubeconfig()).expect("kubeconfig");
    for user in &mut kubeconfig.auth_infos {
        if let Some(auth) = &mut user.auth_info {
            auth.token_file = Some(token_file.display().to_string());
        }
    }
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

async fn create<K>(api: Api<K>, object: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).expect("object");
    api.create(&PostParams::default(), &object)
        .await
        .expect("creating an object")
}

/// One test's piece of the cluster: a meshed namespace with the agents' and a workload's
/// ServiceAccounts, a Node, the agent's pod on it, and the CA's own account and client.
struct Cluster {
    admin: Client,
    ca: Client,
    namespace: String,
    node: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    async fn new(tag: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = client_with_token_file(&plane().plane.dir().join("admin.token")).await;
        let namespace = format!("tr-{tag}");
        let node = format!("tr-{tag}-node");
        create(
            Api::<Node>::all(admin.clone()),
            json!({"metadata": {"name": node}}),
        )
        .await;
        let cluster = Self {
            ca: admin.clone(),
            admin,
            namespace,
            node,
            dir,
        };
        cluster.namespace(&cluster.namespace, true).await;
        for account in ["agent", "ca", "web"] {
            cluster.service_account(&cluster.namespace, account).await;
        }
        // The chart's CA permissions (deploy/helm/nodemesh/templates/rbac.yaml).
        let role = format!("tr-{tag}-ca");
        create(
            Api::<ClusterRole>::all(cluster.admin.clone()),
            json!({"metadata": {"name": role}, "rules": [
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                {"apiGroups": [""], "resources": ["pods", "namespaces"], "verbs": ["get"]},
            ]}),
        )
        .await;
        create(
            Api::<ClusterRoleBinding>::all(cluster.admin.clone()),
            json!({"metadata": {"name": role},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                   "subjects": [{"kind": "ServiceAccount", "name": "ca", "namespace": cluster.namespace}]}),
        )
        .await;
        let ca_token = cluster.token("ca", None, &[]).await;
        let ca_token_file = cluster.dir.path().join("ca-token");
        std::fs::write(&ca_token_file, ca_token).expect("CA token");
        Self {
            ca: client_with_token_file(&ca_token_file).await,
            ..cluster
        }
    }

    async fn namespace(&self, name: &str, meshed: bool) {
        let labels = if meshed {
            json!({"nodemesh.io/mesh": "enabled"})
        } else {
            json!({})
        };
        Api::<Namespace>::all(self.admin.clone())
            .patch(
                name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace",
                                     "metadata": {"name": name, "labels": labels}})),
            )
            .await
            .expect("namespace");
    }

    async fn service_account(&self, namespace: &str, name: &str) {
        create(
            Api::<ServiceAccount>::namespaced(self.admin.clone(), namespace),
            json!({"metadata": {"name": name, "namespace": namespace}}),
        )
        .await;
    }

    /// A pod of `account` on this test's node; returns its UID.
    async fn pod(&self, namespace: &str, name: &str, account: &str) -> String {
        let pod: Pod = create(
            Api::namespaced(self.admin.clone(), namespace),
            json!({"metadata": {"name": name, "namespace": namespace},
                   "spec": {"nodeName": self.node, "serviceAccountName": account,
                            "containers": [{"name": "app", "image": "registry.example/app:1"}]}}),
        )
        .await;
        pod.metadata.uid.expect("a uid")
    }

    /// A token of this namespace's `account` for `audiences` (empty: the API server's own),
    /// bound to the pod `(name, uid)` if given, from the TokenRequest API.
    async fn token(
        &self,
        account: &str,
        bound: Option<(&str, &str)>,
        audiences: &[&str],
    ) -> String {
        let audiences: Vec<String> = audiences.iter().map(|a| (*a).to_owned()).collect();
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: (!audiences.is_empty()).then_some(audiences),
                bound_object_ref: bound.map(|(name, uid)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(name.into()),
                    uid: Some(uid.into()),
                }),
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.admin.clone(), &self.namespace)
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .expect("token request")
            .status
            .and_then(|status| status.token)
            .expect("a token")
    }

    fn reviewer(&self) -> TokenReviewer {
        TokenReviewer::new(
            self.ca.clone(),
            AUDIENCE,
            &format!("{}/agent", self.namespace),
        )
    }

    /// TokenReviews this test's CA has made, as the API server's audit log records them.
    fn reviews(&self) -> usize {
        let user = format!(
            "\"username\":\"system:serviceaccount:{}:ca\"",
            self.namespace
        );
        std::fs::read_to_string(&plane().audit_log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(&user) && line.contains("\"resource\":\"tokenreviews\""))
            .count()
    }
}

fn source(text: &str) -> IpAddr {
    text.parse().expect("address")
}

fn refusal(outcome: Result<String, ReviewError>) -> String {
    match outcome {
        Err(ReviewError::Refused(refusal)) => refusal.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn the_api_server_names_the_agents_node_and_refuses_every_other_token() {
    run(async {
        let cluster = Cluster::new("review").await;
        let agent_uid = cluster.pod(&cluster.namespace, "agent", "agent").await;
        let web_uid = cluster.pod(&cluster.namespace, "web-1", "web").await;
        let reviewer = cluster.reviewer();
        let from = source("10.0.0.1");

        let agent = cluster
            .token("agent", Some(("agent", &agent_uid)), &[AUDIENCE])
            .await;
        assert_eq!(reviewer.node_of(&agent, from).await.unwrap(), cluster.node);

        // The agent's own token, for the API server's audience instead of ours.
        let api_audience = cluster
            .token("agent", Some(("agent", &agent_uid)), &[])
            .await;
        let refused = refusal(reviewer.node_of(&api_audience, from).await);
        assert!(
            refused.contains("token rejected by the API server")
                && refused.contains("invalid for the target audiences [\"nodemesh\"]"),
            "{refused}"
        );
        // A workload minted a token with our audience for itself.
        let workload = cluster
            .token("web", Some(("web-1", &web_uid)), &[AUDIENCE])
            .await;
        let refused = refusal(reviewer.node_of(&workload, from).await);
        assert!(
            refused.contains(&format!(
                "token belongs to system:serviceaccount:{}:web, not to the agent's ServiceAccount",
                cluster.namespace
            )),
            "{refused}"
        );
        let unbound = cluster.token("agent", None, &[AUDIENCE]).await;
        let refused = refusal(reviewer.node_of(&unbound, from).await);
        assert!(refused.contains("is not bound to a pod"), "{refused}");
        let refused = refusal(reviewer.node_of("made-up", from).await);
        assert!(
            refused.contains("token rejected by the API server"),
            "{refused}"
        );
        assert_eq!(cluster.reviews(), 5, "each token reviewed once");
    });
}

#[test]
fn answers_are_cached_accepted_until_expiry_refused_briefly() {
    run(async {
        let cluster = Cluster::new("cache").await;
        let uid = cluster.pod(&cluster.namespace, "agent", "agent").await;
        let agent = cluster
            .token("agent", Some(("agent", &uid)), &[AUDIENCE])
            .await;
        let accepted_for = Duration::from_millis(1500);
        let refused_for = Duration::from_millis(500);
        let reviewer = cluster.reviewer().caching_for(accepted_for, refused_for);
        let from = source("10.0.0.1");

        for _ in 0..5 {
            assert_eq!(reviewer.node_of(&agent, from).await.unwrap(), cluster.node);
            assert!(reviewer.node_of("made-up", from).await.is_err());
        }
        assert_eq!(
            cluster.reviews(),
            2,
            "one review per token for 5 requests each"
        );

        // Each is asked about again once its time is up: the refusal first.
        let started = Instant::now();
        let mut reviews = cluster.reviews();
        while reviews == 2 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never reviewed again"
            );
            assert!(reviewer.node_of("made-up", from).await.is_err());
            reviewer.node_of(&agent, from).await.unwrap();
            reviews = cluster.reviews();
        }
        assert!(started.elapsed() >= refused_for - Duration::from_millis(100));
        while cluster.reviews() < 4 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never reviewed again"
            );
            reviewer.node_of(&agent, from).await.unwrap();
        }
        assert!(started.elapsed() >= accepted_for - Duration::from_millis(600));
    });
}

#[test]
fn a_flood_of_reviews_from_one_source_is_refused_past_its_burst_and_others_are_served() {
    run(async {
        let cluster = Cluster::new("flood").await;
        let uid = cluster.pod(&cluster.namespace, "agent", "agent").await;
        let agent = cluster
            .token("agent", Some(("agent", &uid)), &[AUDIENCE])
            .await;
        let reviewer = cluster.reviewer();
        let (flooder, agent_node) = (source("10.0.0.66"), source("10.0.0.2"));
        assert_eq!(
            reviewer.node_of(&agent, agent_node).await.unwrap(),
            cluster.node
        );

        // Distinct made-up tokens, so that none is answered from the cache.
        let started = Instant::now();
        let attempts = REVIEW_BURST.get() + 10;
        let mut limited = 0;
        for i in 0..attempts {
            match reviewer.node_of(&format!("made-up-{i}"), flooder).await {
                Err(ReviewError::RateLimited(from)) => {
                    assert_eq!(from, flooder);
                    limited += 1;
                }
                Err(ReviewError::Refused(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        let reviewed = attempts - limited;
        // The burst, and what the rate gave back while the flood ran.
        let replenished =
            (started.elapsed().as_secs_f64() * f64::from(REVIEWS_PER_SECOND.get())).ceil() as u32;
        assert!(
            (REVIEW_BURST.get()..=REVIEW_BURST.get() + replenished).contains(&reviewed),
            "{reviewed} of {attempts} reviewed"
        );
        assert_eq!(
            cluster.reviews(),
            1 + reviewed as usize,
            "the refused ones were not asked"
        );

        // The same /64 is one source for IPv6.
        let v6 = [source("2001:db8::1"), source("2001:db8::2:1")];
        let mut i = 0;
        while !matches!(
            reviewer.node_of(&format!("v6-{i}"), v6[0]).await,
            Err(ReviewError::RateLimited(_))
        ) {
            i += 1;
            assert!(i <= attempts, "never limited");
        }
        assert!(matches!(
            reviewer.node_of("v6-more", v6[1]).await,
            Err(ReviewError::RateLimited(_))
        ));

        // Another source is still reviewed, and answers already known are given to anyone
        // presenting the token, the flooder's source included.
        let other = cluster
            .token("agent", Some(("agent", &uid)), &[AUDIENCE])
            .await;
        assert_eq!(
            reviewer.node_of(&other, source("10.0.0.3")).await.unwrap(),
            cluster.node
        );
        assert_eq!(
            reviewer.node_of(&agent, flooder).await.unwrap(),
            cluster.node
        );
    });
}

/// A CA that asks the API server: names in requests reach its URLs, the identity comes from
/// the pod it read, and the chart's CA permissions suffice (namespaces are read too).
#[test]
fn the_ca_decides_on_the_pod_and_namespace_the_api_server_holds() {
    run(async {
        let cluster = Cluster::new("sign").await;
        let agent_uid = cluster.pod(&cluster.namespace, "agent", "agent").await;
        let web_uid = cluster.pod(&cluster.namespace, "web-1", "web").await;
        // Another namespace's pod on the same node, with a powerful account.
        let other = format!("{}-other", cluster.namespace);
        cluster.namespace(&other, true).await;
        cluster.service_account(&other, "admin").await;
        let victim_uid = cluster.pod(&other, "victim", "admin").await;
        let plain = format!("{}-plain", cluster.namespace);
        cluster.namespace(&plain, false).await;
        cluster.service_account(&plain, "web").await;
        let plain_uid = cluster.pod(&plain, "web-2", "web").await;

        let token = cluster
            .token("agent", Some(("agent", &agent_uid)), &[AUDIENCE])
            .await;
        let ca_dir = tempfile::tempdir().expect("tempdir");
        init_ca(ca_dir.path(), "cluster.local", Duration::from_secs(3600)).expect("CA files");
        let issuer = WorkloadIssuer::from_files(
            &ca_dir.path().join("issuer-cert.pem"),
            &ca_dir.path().join("issuer-key.pem"),
        )
        .expect("issuer");
        let ca = CertificateAuthority::new(
            issuer,
            "cluster.local",
            Authenticator::TokenReview(Box::new(cluster.reviewer())),
            PodDirectory::Api(cluster.ca.clone()),
            Duration::from_secs(3600),
        );
        let peer: SocketAddr = "10.0.0.1:40000".parse().expect("address");
        let csr = {
            let key = rcgen::KeyPair::generate().expect("key");
            rcgen::CertificateParams::default()
                .serialize_request(&key)
                .and_then(|csr| csr.pem())
                .expect("CSR")
        };
        let ask = |namespace: &str, pod: &str, uid: &str| SignRequest {
            namespace: namespace.into(),
            pod: pod.into(),
            uid: Some(uid.into()),
            csr: csr.clone(),
        };

        let issued = ca
            .sign(
                Some(&token),
                &ask(&cluster.namespace, "web-1", &web_uid),
                peer,
            )
            .await
            .expect("issued");
        assert_eq!(
            issued.spiffe_id,
            format!("spiffe://cluster.local/ns/{}/sa/web", cluster.namespace)
        );

        // The attack the name checks stop: a name that is not a name changes the URL the CA
        // reads. Without the check, a "namespace" ending in `/pods/victim?` turns any
        // lookup into one of the victim, in another namespace than the request names.
        let injected = format!("{other}/pods/victim?");
        let read = PodDirectory::Api(cluster.ca.clone())
            .pod(&injected, "web-1")
            .await
            .expect("lookup")
            .expect("the API server answered with a pod");
        assert_eq!(
            (
                read.metadata.namespace.as_deref(),
                read.metadata.name.as_deref()
            ),
            (Some(other.as_str()), Some("victim"))
        );
        for (namespace, pod) in [
            (injected.as_str(), "web-1"),
            (
                cluster.namespace.as_str(),
                &format!("../../{other}/pods/victim"),
            ),
        ] {
            let refused = ca
                .sign(Some(&token), &ask(namespace, pod, &victim_uid), peer)
                .await
                .unwrap_err();
            assert!(matches!(refused, CaError::InvalidRequest(_)), "{refused}");
            assert_eq!(refused.status(), 400);
        }

        let refused = ca
            .sign(Some(&token), &ask(&plain, "web-2", &plain_uid), peer)
            .await
            .unwrap_err();
        assert_eq!(refused.status(), 403, "{refused}");
        assert!(
            refused.to_string().contains("is not in the mesh"),
            "{refused}"
        );

        // Past its review burst, a source gets 429 instead of 401, without the CA asking.
        let mut statuses = Vec::new();
        for i in 0..REVIEW_BURST.get() + 5 {
            let made_up = format!("made-up-{i}");
            let refused = ca
                .sign(
                    Some(&made_up),
                    &ask(&cluster.namespace, "web-1", &web_uid),
                    peer,
                )
                .await
                .unwrap_err();
            statuses.push(refused.status().as_u16());
        }
        assert_eq!(statuses.first(), Some(&401), "{statuses:?}");
        assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    });
}

#[test]
fn an_accepted_token_is_kept_no_longer_than_it_is_valid() {
    let token = |claims: Value| {
        let encode = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.signature",
            encode(br#"{"alg":"RS256"}"#),
            encode(claims.to_string().as_bytes())
        )
    };
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let at_most = Duration::from_secs(60);
    for (claims, expected) in [
        (json!({"exp": 1_800_000_030u64}), Duration::from_secs(30)),
        (json!({"exp": 1_800_003_600u64}), at_most),
        (json!({"exp": 1_799_999_999u64}), Duration::ZERO),
        (json!({"sub": "no expiry"}), at_most),
    ] {
        assert_eq!(
            accepted_for(&token(claims.clone()), now, at_most),
            expected,
            "{claims}"
        );
    }
    assert_eq!(accepted_for("not-a-jwt", now, at_most), at_most);
}
