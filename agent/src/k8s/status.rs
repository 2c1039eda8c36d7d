//! What the cluster source is doing, watch by watch, for `/config_dump` and `nodemesh status`:
//! listing, watching, retrying after an error (which, and when the next try is), or disabled
//! because the API server does not serve the resource.

use std::{collections::BTreeMap, sync::Mutex, time::SystemTime};

/// One watch (or the manifest directory) as an operator sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WatchView {
    /// What is watched, e.g. `Pods (cluster-wide)`.
    pub watch: String,
    /// The API path (or the directory).
    pub resource: String,
    pub state: WatchState,
    /// How the initial list is made: `streaming` (WatchList) or `paged`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_list: Option<&'static str>,
    /// Why it is retrying or disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When the state last changed (seconds since the epoch).
    pub since_unix: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchState {
    /// Making its first list, or listing again (after 410 Gone).
    Listing,
    Watching,
    /// The last attempt failed; it tries again after a backoff.
    Retrying,
    /// The API server does not serve the resource; discovery checks again periodically.
    Disabled,
}

/// Every watch of the source, by name, shared by the watch tasks and the admin server.
#[derive(Debug, Default)]
pub struct SourceStatus {
    watches: Mutex<BTreeMap<String, WatchView>>,
}

impl SourceStatus {
    /// Records the state of the watch `watch` of `resource`.
    pub fn set(
        &self,
        watch: &str,
        resource: &str,
        state: WatchState,
        initial_list: Option<&'static str>,
        detail: Option<String>,
    ) {
        let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let unchanged = watches.get(watch).is_some_and(|w| {
            w.state == state && w.detail == detail && w.initial_list == initial_list
        });
        if unchanged {
            return;
        }
        let since_unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        watches.insert(
            watch.to_owned(),
            WatchView {
                watch: watch.to_owned(),
                resource: resource.to_owned(),
                state,
                initial_list,
                detail,
                since_unix,
            },
        );
    }

    pub fn views(&self) -> Vec<WatchView> {
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.values().cloned().collect()
    }
}
