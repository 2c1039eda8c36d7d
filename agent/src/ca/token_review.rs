//! The CA's authentication of agents in a cluster: a Kubernetes TokenReview of the token the
//! agent presents, cached and rate-limited, since anyone who reaches the CA can make it ask.
//!
//! The review requires the token to be authenticated for the CA's audience, of the agents'
//! own ServiceAccount (any workload can mint a token with our audience), and bound to a pod;
//! the node is the token's pod binding (the `authentication.kubernetes.io/node-name` extra,
//! or, on API servers that do not add it, the bound pod's `spec.nodeName`).
//!
//! - **Cache**: each answer is kept under the token's SHA-256 (never the token itself) in an
//!   LRU of [`CACHE_ENTRIES`]: a node for [`ACCEPTED_FOR`] or until the token expires (its
//!   `exp` claim, read once the API server has vouched for the token), whichever is first; a
//!   refusal for [`REFUSED_FOR`]. An agent asking for several certificates with one token
//!   costs one review; a bound pod deleted meanwhile is noticed within [`ACCEPTED_FOR`].
//!   Failures to ask (the API server unreachable) are not kept.
//! - **Rate limit**: the reviews a source address makes the CA ask for (cache misses) are
//!   limited to [`REVIEWS_PER_SECOND`] per second after a burst of [`REVIEW_BURST`] (GCRA,
//!   `governor`), per address or IPv6 /64; over it the CA answers 429 without asking. The
//!   state of the [`LIMITED_SOURCES`] most recent sources is kept (an LRU as governor's state
//!   store, so the memory is bounded however many addresses a flood comes from; a source
//!   evicted meanwhile starts again with a full burst).

use std::{
    net::IpAddr,
    num::{NonZeroU32, NonZeroUsize},
    sync::Mutex,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use governor::{
    Quota, RateLimiter, clock::DefaultClock, middleware::NoOpMiddleware, nanos::Nanos,
    state::StateStore,
};
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, api::PostParams};
use lru::LruCache;

use crate::bounds::per_host;

/// TokenReview `user.extra` keys of a token bound to a pod.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";

/// Reviews kept at once.
pub const CACHE_ENTRIES: NonZeroUsize = NonZeroUsize::new(4096).unwrap();
/// How long an accepted token is taken without asking again (less if it expires sooner).
pub const ACCEPTED_FOR: Duration = Duration::from_secs(60);
/// How long a refused token is refused without asking again.
pub const REFUSED_FOR: Duration = Duration::from_secs(10);
/// Reviews one source may cause per second, after a burst of [`REVIEW_BURST`].
pub const REVIEWS_PER_SECOND: NonZeroU32 = NonZeroU32::new(2).unwrap();
pub const REVIEW_BURST: NonZeroU32 = NonZeroU32::new(20).unwrap();
/// Sources whose rate is tracked at once.
pub const LIMITED_SOURCES: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// Why a token names no node: the API server's answer, kept in the cache.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Refusal {
    #[error("token rejected by the API server: {0}")]
    Rejected(String),
    #[error("token belongs to {0}, not to the agent's ServiceAccount {1}")]
    NotTheAgent(String, String),
    #[error("token of {0} is not bound to a pod, so it names no node")]
    Unbound(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(
        "too many token reviews from {0}: at most {REVIEW_BURST} at once and {REVIEWS_PER_SECOND} per second per source"
    )]
    RateLimited(IpAddr),
    #[error("asking the API server: {0}")]
    Api(#[from] kube::Error),
}

struct Cached {
    answer: Result<String, Refusal>,
    until: Instant,
}

/// Governor's state per source, in an LRU.
struct RecentSources(Mutex<LruCache<IpAddr, Nanos>>);

impl StateStore for RecentSources {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut sources = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (outcome, state) = f(sources.get(key).copied())?;
        sources.put(*key, state);
        Ok(outcome)
    }
}

type SourceLimiter = RateLimiter<IpAddr, RecentSources, DefaultClock, NoOpMiddleware>;

pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    /// `<namespace>/<name>` of the agents' ServiceAccount.
    agent_service_account: String,
    cache: Mutex<LruCache<[u8; 32], Cached>>,
    accepted_for: Duration,
    refused_for: Duration,
    limiter: SourceLimiter,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: &str, agent_service_account: &str) -> Self {
        let quota = Quota::per_second(REVIEWS_PER_SECOND).allow_burst(REVIEW_BURST);
        let sources = RecentSources(Mutex::new(LruCache::new(LIMITED_SOURCES)));
        Self {
            client,
            audience: audience.to_owned(),
            agent_service_account: agent_service_account.to_owned(),
            cache: Mutex::new(LruCache::new(CACHE_ENTRIES)),
            accepted_for: ACCEPTED_FOR,
            refused_for: REFUSED_FOR,
            limiter: RateLimiter::new(quota, sources, DefaultClock::default()),
        }
    }

    /// The same with shorter cache lifetimes, for tests that see entries expire.
    #[cfg(test)]
    fn caching_for(mut self, accepted: Duration, refused: Duration) -> Self {
        (self.accepted_for, self.refused_for) = (accepted, refused);
        self
    }

    /// The node whose agent holds `token`, presented from `source`.
    pub async fn node_of(&self, token: &str, source: IpAddr) -> Result<String, ReviewError> {
        let key = digest(token);
        if let Some(answer) = self.cached(&key) {
            return answer.map_err(ReviewError::Refused);
        }
        let source = per_host(source);
        if self.limiter.check_key(&source).is_err() {
            return Err(ReviewError::RateLimited(source));
        }
        let answer = match self.review(token).await {
            Err(ReviewError::Refused(refusal)) => Err(refusal),
            Err(other) => return Err(other),
            Ok(node) => Ok(node),
        };
        let now = Instant::now();
        let until = match &answer {
            Ok(_) => now + accepted_for(token, SystemTime::now(), self.accepted_for),
            Err(_) => now + self.refused_for,
        };
        tracing::debug!(%source, accepted = answer.is_ok(), "token reviewed");
        self.lock_cache().put(
            key,
            Cached {
                answer: answer.clone(),
                until,
            },
        );
        answer.map_err(ReviewError::Refused)
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Result<String, Refusal>> {
        let mut cache = self.lock_cache();
        let entry = cache.get(key)?;
        if entry.until > Instant::now() {
            return Some(entry.answer.clone());
        }
        cache.pop(key);
        None
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, LruCache<[u8; 32], Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn review(&self, token: &str) -> Result<String, ReviewError> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &request)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Refusal::Rejected(
                status
                    .error
                    .unwrap_or_else(|| "not authenticated".to_owned()),
            )
            .into());
        }
        if !status
            .audiences
            .iter()
            .flatten()
            .any(|a| *a == self.audience)
        {
            return Err(Refusal::Rejected(format!(
                "the token is for {:?}, not for the {:?} audience",
                status.audiences.unwrap_or_default(),
                self.audience
            ))
            .into());
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let (namespace, name) = self
            .agent_service_account
            .split_once('/')
            .unwrap_or(("", &self.agent_service_account));
        if username != format!("system:serviceaccount:{namespace}:{name}") {
            return Err(Refusal::NotTheAgent(username, self.agent_service_account.clone()).into());
        }
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|values| values.first()).cloned();
        if let Some(node) = first(EXTRA_NODE_NAME) {
            return Ok(node);
        }
        let Some(pod_name) = first(EXTRA_POD_NAME) else {
            return Err(Refusal::Unbound(username).into());
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get(&pod_name)
            .await?;
        pod.spec
            .and_then(|spec| spec.node_name)
            .ok_or_else(|| Refusal::Unbound(username).into())
    }
}

/// How long an accepted token is taken: `at_most`, or less if its `exp` claim says it
/// expires sooner (nothing once it has).
fn accepted_for(token: &str, now: SystemTime, at_most: Duration) -> Duration {
    let expires = token
        .split('.')
        .nth(1)
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .ok()
        })
        .and_then(|claims| serde_json::from_slice::<serde_json::Value>(&claims).ok())
        .and_then(|claims| claims.get("exp")?.as_u64())
        .map(|exp| UNIX_EPOCH + Duration::from_secs(exp));
    match expires {
        Some(at) => at.duration_since(now).unwrap_or_default().min(at_most),
        None => at_most,
    }
}

fn digest(token: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref(),
    );
    key
}

#[cfg(test)]
mod tests;
