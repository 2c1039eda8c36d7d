//! Draining: the proxy's connections in flight when the agent stops accepting (a successor
//! took its listeners over, or it was told to stop). Every accepted connection is tracked
//! until its task ends; HTTP servers are told to finish gracefully (HTTP/1.1 closes after the
//! response in flight, HTTP/2 and HBONE send GOAWAY), so clients move to new connections
//! while plain TCP relays run to their natural end.
//!
//! This is a property of the process (one agent per process), hence process-wide state.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        LazyLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Notify, watch};

struct DrainState {
    draining: watch::Sender<bool>,
    active: AtomicUsize,
    idle: Notify,
}

static STATE: LazyLock<DrainState> = LazyLock::new(|| DrainState {
    draining: watch::Sender::new(false),
    active: AtomicUsize::new(0),
    idle: Notify::new(),
});

/// Held by the task serving one accepted connection; dropping it ends the tracking.
pub struct Tracked(());

impl Drop for Tracked {
    fn drop(&mut self) {
        if STATE.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            STATE.idle.notify_waiters();
        }
    }
}

/// Starts tracking one accepted connection.
pub fn track() -> Tracked {
    STATE.active.fetch_add(1, Ordering::AcqRel);
    Tracked(())
}

/// Connections accepted and not finished yet.
pub fn active() -> usize {
    STATE.active.load(Ordering::Acquire)
}

/// Tells every HTTP server connection to finish gracefully.
pub fn begin() {
    STATE.draining.send_replace(true);
}

/// Resolves once draining has begun.
pub async fn begun() {
    let mut draining = STATE.draining.subscribe();
    // The sender lives in a static: it is never dropped, so this cannot fail.
    let _ = draining.wait_for(|draining| *draining).await;
}

/// Waits until no connection is left or `grace` has passed; returns how many are left.
pub async fn settle(grace: Duration) -> usize {
    let idle = async {
        loop {
            let notified = STATE.idle.notified();
            if active() == 0 {
                return;
            }
            notified.await;
        }
    };
    let _ = tokio::time::timeout(grace, idle).await;
    active()
}

/// Drives an HTTP server connection to its end; when draining begins, `shut_down` starts
/// its graceful shutdown (requests in flight complete, no new ones are taken) and the
/// connection is driven until that finishes.
pub async fn serve_until_drained<C: Future>(
    connection: C,
    shut_down: impl FnOnce(Pin<&mut C>),
) -> C::Output {
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        output = connection.as_mut() => return output,
        () = begun() => shut_down(connection.as_mut()),
    }
    connection.await
}

/// Wraps `serve` so that the connection it serves is tracked for as long as it runs.
pub fn tracked<F: Future>(serve: F) -> impl Future<Output = F::Output> {
    let guard = track();
    async move {
        let output = serve.await;
        drop(guard);
        output
    }
}
