//! One watch of one kind: kube-rs's watcher lists, then watches from the list's
//! resourceVersion with bookmarks on, resumes from the last resourceVersion (or bookmark)
//! after a dropped connection, and lists again after 410 Gone. Each event goes to a [`Sink`]
//! at once, transformed into the compact form the agent keeps (no store of whole objects,
//! no second copy during a relist).
//!
//! The initial list is a streaming list (`sendInitialEvents`, WatchList) where the server
//! supports it: objects arrive one by one on the watch instead of in pages. A server that
//! refuses it (WatchList off, or older than 1.27) is listed in pages instead, and that is
//! logged once. Errors say which watch of which resource failed, doing what, and when the
//! next try is (exponential backoff with jitter, 0.8 s to 30 s).

use std::{fmt::Debug, sync::Arc, time::Duration};

use futures_util::StreamExt;
use kube::{
    Api, Resource,
    runtime::{
        utils::Backoff,
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};

use super::status::{SourceStatus, WatchState};

/// Where a watch's events go: the compact store of its kind.
pub trait Sink<K>: Send + 'static {
    /// A (re)list starts; what it does not mention by `end_relist` is gone.
    fn begin_relist(&mut self);
    fn apply(&mut self, object: K);
    fn delete(&mut self, object: K);
    fn end_relist(&mut self);
}

/// The watches that have not completed their first list yet, by name.
pub type Unsynced = Arc<watch::Sender<Vec<&'static str>>>;

/// What one watch reports to, and how it is named in logs and the status.
#[derive(Clone)]
pub struct WatchContext {
    /// E.g. `Pods (cluster-wide)`.
    pub name: &'static str,
    /// The API path, e.g. `/api/v1/pods`.
    pub resource: String,
    pub status: Arc<SourceStatus>,
    pub unsynced: Unsynced,
    /// Woken after each change the reconciler must see (None: the sink's index is read
    /// live, nothing to recompute).
    pub changes: Option<mpsc::Sender<()>>,
    /// The resource may not be served (a CRD): a 404 ends the watch instead of retrying.
    pub optional: bool,
}

/// Why a watch ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The API server answered 404: the resource is not (or no longer) served.
    NotServed,
}

impl WatchContext {
    fn report(&self, state: WatchState, list: &'static str, detail: Option<String>) {
        self.status
            .set(self.name, &self.resource, state, Some(list), detail);
    }

    fn synced(&self) {
        self.unsynced.send_if_modified(|unsynced| {
            let before = unsynced.len();
            unsynced.retain(|name| *name != self.name);
            unsynced.len() != before
        });
    }

    fn changed(&self) {
        if let Some(changes) = &self.changes {
            // A full channel already holds a wake-up: nothing is lost.
            let _ = changes.try_send(());
        }
    }
}

/// Runs the watch until its task is aborted (or, for an optional resource, until the server
/// says it does not serve it).
pub async fn run<K, S>(
    api: Api<K>,
    config: watcher::Config,
    mut sink: S,
    ctx: WatchContext,
) -> Ended
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    S: Sink<K>,
{
    let mut streaming = true;
    let mut backoff = watcher::DefaultBackoff::default();
    loop {
        let list = if streaming { "streaming" } else { "paged" };
        let watcher_config = if streaming {
            config.clone().streaming_lists()
        } else {
            config.clone()
        };
        ctx.report(WatchState::Listing, list, None);
        let mut state = WatchState::Listing;
        let mut stream = std::pin::pin!(watcher::watcher(api.clone(), watcher_config));
        while let Some(event) = stream.next().await {
            let error = match event {
                Ok(event) => {
                    backoff.reset();
                    state = deliver(event, &mut sink, &ctx, list, state);
                    continue;
                }
                Err(error) => error,
            };
            if streaming && refuses_streaming_lists(&error) {
                tracing::info!(
                    watch = ctx.name,
                    resource = %ctx.resource,
                    "the API server does not serve streaming lists (WatchList) for {}: listing in pages ({})",
                    ctx.resource,
                    describe(&error)
                );
                streaming = false;
                break;
            }
            if ctx.optional && not_served(&error) {
                return Ended::NotServed;
            }
            let what = describe(&error);
            if is_gone(&error) {
                // The watcher lists again at once; nothing is wrong with the server.
                tracing::info!(watch = ctx.name, resource = %ctx.resource, "Kubernetes watch of {} ({}): {what}", ctx.name, ctx.resource);
                continue;
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(30));
            tracing::warn!(
                watch = ctx.name,
                resource = %ctx.resource,
                retry_in_ms = delay.as_millis() as u64,
                "Kubernetes watch of {} ({}) failed {what}; retrying in {delay:.1?}",
                ctx.name,
                ctx.resource,
            );
            ctx.report(
                WatchState::Retrying,
                list,
                Some(format!("failed {what}; retrying in {delay:.1?}")),
            );
            tokio::time::sleep(delay).await;
            // Optimistic: the next error (if any) says otherwise.
            ctx.report(state, list, None);
        }
    }
}

/// Applies one event to the sink; returns the watch's state after it.
fn deliver<K, S: Sink<K>>(
    event: Event<K>,
    sink: &mut S,
    ctx: &WatchContext,
    list: &'static str,
    state: WatchState,
) -> WatchState {
    match event {
        Event::Init => {
            sink.begin_relist();
            ctx.report(WatchState::Listing, list, None);
            return WatchState::Listing;
        }
        // The reconciler hears of the list once, when it is complete.
        Event::InitApply(object) => {
            sink.apply(object);
            return state;
        }
        Event::Apply(object) => sink.apply(object),
        Event::Delete(object) => sink.delete(object),
        Event::InitDone => {
            sink.end_relist();
            // Watching before synced: whoever waits for the sync sees the state it reached.
            ctx.report(WatchState::Watching, list, None);
            ctx.synced();
            ctx.changed();
            return WatchState::Watching;
        }
    }
    if state != WatchState::Watching {
        ctx.report(WatchState::Watching, list, None);
    }
    ctx.changed();
    WatchState::Watching
}

/// What went wrong, in words: the step that failed and every cause, not just the outermost
/// (`client error (Connect)` says nothing without `tcp connect error: Connection refused`).
pub fn describe(error: &watcher::Error) -> String {
    match error {
        watcher::Error::InitialListFailed(e) => format!("listing: {}", client_error(e)),
        watcher::Error::WatchStartFailed(e) => format!("starting the watch: {}", client_error(e)),
        watcher::Error::WatchError(status) if status.code == 410 => {
            "the watch's resourceVersion is too old (410 Gone): listing again".to_owned()
        }
        watcher::Error::WatchError(status) => format!(
            "while watching: the API server sent an error: {} {}: {}",
            status.code, status.reason, status.message
        ),
        watcher::Error::WatchFailed(e) => format!("while watching: {}", client_error(e)),
        watcher::Error::NoResourceVersion => {
            "listing: the API server sent no resourceVersion".to_owned()
        }
    }
}

/// A client error with its causes; an API error as code, reason and message.
pub fn client_error(error: &kube::Error) -> String {
    if let kube::Error::Api(status) = error {
        return format!("{} {}: {}", status.code, status.reason, status.message);
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Wrappers often repeat their cause in their own message.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn api_status(error: &watcher::Error) -> Option<u16> {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => Some(status.code),
        watcher::Error::WatchError(status) => Some(status.code),
        _ => None,
    }
}

/// A server without WatchList refuses `sendInitialEvents` as an invalid request.
fn refuses_streaming_lists(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchStartFailed(kube::Error::Api(status)) if matches!(status.code, 400 | 422))
}

fn not_served(error: &watcher::Error) -> bool {
    api_status(error) == Some(404)
}

fn is_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchError(status) if status.code == 410)
}
