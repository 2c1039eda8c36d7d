//! Draining: the proxy's connections in flight when the agent stops accepting (a successor
//! took its listeners over, or it was told to stop). Every accepted connection is tracked
//! until its task ends (tokio-util's `TaskTracker`); HTTP servers are told to finish
//! gracefully when draining begins (a `CancellationToken`): HTTP/1.1 closes after the
//! response in flight, HTTP/2 and HBONE send GOAWAY, so clients move to new connections
//! while plain TCP relays run to their natural end. DNS queries in flight are tracked the
//! same way (`dns/server.rs`), so their answers are sent before the agent exits.
//!
//! The agent makes one [`Drain`] and hands clones to the proxy's contexts.

use std::{future::Future, pin::Pin, time::Duration};

use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TrackedFuture},
};

/// The agent's connections and whether they are being drained. Clones share both.
#[derive(Clone, Default)]
pub struct Drain {
    draining: CancellationToken,
    connections: TaskTracker,
}

impl Drain {
    /// Connections accepted and not finished yet.
    pub fn active(&self) -> usize {
        self.connections.len()
    }

    /// Tells every HTTP server connection to finish gracefully.
    pub fn begin(&self) {
        self.draining.cancel();
    }

    /// Waits until no connection is left or `grace` has passed; returns how many are left.
    pub async fn settle(&self, grace: Duration) -> usize {
        // Closed, the tracker's wait ends when its count reaches zero (connections tracked
        // later only delay that).
        self.connections.close();
        let _ = tokio::time::timeout(grace, self.connections.wait()).await;
        self.active()
    }

    /// Drives an HTTP server connection to its end; when draining begins, `shut_down`
    /// starts its graceful shutdown (requests in flight complete, no new ones are taken)
    /// and the connection is driven until that finishes.
    pub async fn serve_until_drained<C: Future>(
        &self,
        connection: C,
        shut_down: impl FnOnce(Pin<&mut C>),
    ) -> C::Output {
        let mut connection = std::pin::pin!(connection);
        tokio::select! {
            output = connection.as_mut() => return output,
            () = self.draining.cancelled() => shut_down(connection.as_mut()),
        }
        connection.await
    }

    /// Wraps `serve` so that the connection it serves is tracked for as long as it runs. (A
    /// wrapper struct, not an `async` block: a block would hold `serve` twice, and this
    /// future lives as long as the connection.)
    pub fn tracked<F: Future>(&self, serve: F) -> TrackedFuture<F> {
        self.connections.track_future(serve)
    }
}
