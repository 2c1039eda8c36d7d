//! Draining: the proxy's connections in flight when the agent stops accepting (a successor
//! took its listeners over, or it was told to stop). Every accepted connection is tracked
//! until its task ends (tokio-util's `TaskTracker`); HTTP servers are told to finish
//! gracefully when draining begins (a `CancellationToken`): HTTP/1.1 closes after the
//! response in flight, HTTP/2 and HBONE send GOAWAY, so clients move to new connections
//! while plain TCP relays run to their natural end.
//!
//! This is a property of the process (one agent per process), hence process-wide state.

use std::{future::Future, pin::Pin, sync::LazyLock, time::Duration};

use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TrackedFuture},
};

static DRAINING: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);
static CONNECTIONS: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Connections accepted and not finished yet.
pub fn active() -> usize {
    CONNECTIONS.len()
}

/// Tells every HTTP server connection to finish gracefully.
pub fn begin() {
    DRAINING.cancel();
}

/// Resolves once draining has begun.
pub async fn begun() {
    DRAINING.cancelled().await;
}

/// Waits until no connection is left or `grace` has passed; returns how many are left.
pub async fn settle(grace: Duration) -> usize {
    // Closed, the tracker's wait ends when its count reaches zero (new connections can
    // still be tracked; they only delay that).
    CONNECTIONS.close();
    let _ = tokio::time::timeout(grace, CONNECTIONS.wait()).await;
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

/// Wraps `serve` so that the connection it serves is tracked for as long as it runs. (A
/// wrapper struct, not an `async` block: a block would hold `serve` twice, and this future
/// lives as long as the connection.)
pub fn tracked<F: Future>(serve: F) -> TrackedFuture<F> {
    CONNECTIONS.track_future(serve)
}
