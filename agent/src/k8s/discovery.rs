//! Resources the cluster may not serve: Gateway API HTTPRoutes (a cluster without the Gateway
//! API CRDs has none) and nodemesh's AuthorizationPolicies (the chart installs their CRD, a
//! hand-made install may not). API discovery says whether each is served; one that is not is
//! logged once as disabled, with the reason, shown as such in the status, and checked again
//! every minute. Once it is served its watch starts; a watch that hears 404 (the CRD was
//! deleted) ends, its objects are dropped, and discovery takes over again.

use std::{future::Future, pin::Pin, time::Duration};

use kube::{Client, runtime::utils::Backoff, runtime::watcher};
use tokio::task::JoinSet;

use super::{
    status::WatchState,
    watch::{Ended, WatchContext, client_error},
};

/// How often the agent looks again for a resource that is not served.
pub const RECHECK: Duration = Duration::from_secs(60);

/// Starts the watch of an optional resource; resolves when it ends.
pub type StartWatch = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Ended> + Send>> + Send + Sync>;

/// One resource that may not be served.
pub struct Optional {
    pub ctx: WatchContext,
    /// E.g. `gateway.networking.k8s.io/v1`.
    pub group_version: &'static str,
    /// E.g. `httproutes`.
    pub plural: &'static str,
    /// What the mesh does without it (for the log and the status).
    pub without_it: &'static str,
    pub start: StartWatch,
}

/// What discovery last said about a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    Unknown,
    Served,
    NotServed,
}

/// Looks the resources up, starts the watch of each one served, and checks again for the
/// others every `recheck`, until aborted (its watches with it).
pub async fn run(client: Client, recheck: Duration, resources: Vec<Optional>) {
    let mut known = vec![Known::Unknown; resources.len()];
    let mut watching = vec![false; resources.len()];
    let mut running: JoinSet<(usize, Ended)> = JoinSet::new();
    let mut backoff = watcher::DefaultBackoff::default();
    loop {
        let mut failed = false;
        for (index, resource) in resources.iter().enumerate() {
            if watching[index] {
                continue;
            }
            let ctx = &resource.ctx;
            match served(&client, resource.group_version, resource.plural).await {
                Ok(true) => {
                    if known[index] == Known::NotServed {
                        tracing::info!(
                            watch = ctx.name,
                            "{} is served now: watching {}",
                            resource.group_version,
                            ctx.resource
                        );
                    }
                    known[index] = Known::Served;
                    watching[index] = true;
                    let watch = (resource.start)();
                    running.spawn(async move { (index, watch.await) });
                }
                Ok(false) => {
                    let reason = format!(
                        "{} {} is not served by the API server (CRD not installed): {}; checking again every {}s",
                        resource.group_version,
                        resource.plural,
                        resource.without_it,
                        recheck.as_secs()
                    );
                    if known[index] != Known::NotServed {
                        tracing::info!(watch = ctx.name, "{} disabled: {reason}", ctx.name);
                    }
                    known[index] = Known::NotServed;
                    ctx.status.set(
                        ctx.name,
                        &ctx.resource,
                        WatchState::Disabled,
                        None,
                        Some(reason),
                    );
                    // Nothing to wait for: the cluster has none.
                    ctx.unsynced.send_if_modified(|unsynced| {
                        let before = unsynced.len();
                        unsynced.retain(|name| *name != ctx.name);
                        unsynced.len() != before
                    });
                }
                Err(error) => {
                    failed = true;
                    let what = client_error(&error);
                    tracing::warn!(
                        watch = ctx.name,
                        "Kubernetes API discovery of {} {} failed: {what}; retrying",
                        resource.group_version,
                        resource.plural
                    );
                    ctx.status.set(
                        ctx.name,
                        &ctx.resource,
                        WatchState::Retrying,
                        None,
                        Some(format!(
                            "API discovery of {} failed: {what}",
                            resource.group_version
                        )),
                    );
                }
            }
        }
        let wait = if failed {
            backoff.next().unwrap_or(recheck)
        } else {
            backoff.reset();
            recheck
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            Some(Ok((index, Ended::NotServed))) = running.join_next(), if !running.is_empty() => {
                let ctx = &resources[index].ctx;
                tracing::info!(watch = ctx.name, "{} answered 404: checking whether it is still served", ctx.resource);
                watching[index] = false;
            }
        }
    }
}

/// Whether `group_version` serves `plural`.
async fn served(client: &Client, group_version: &str, plural: &str) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(group_version).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == plural)),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(error) => Err(error),
    }
}
