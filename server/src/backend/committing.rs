//! The handle a caller awaits until its write is durable, and the backend's
//! end of it.

use tokio::sync::oneshot;

use super::error::StoreError;

/// Resolves once a submitted write is durable (or failed). Submitting never
/// waits; dropping the handle does not cancel the write, so whatever was
/// submitted is applied even if the request that submitted it went away.
#[must_use = "a request must not be answered before its writes are durable"]
pub(crate) struct Committing<T> {
    rx: oneshot::Receiver<Result<T, StoreError>>,
}

/// The backend's end of a [`Committing`].
pub(crate) struct CommitReply<T> {
    tx: oneshot::Sender<Result<T, StoreError>>,
}

impl<T> CommitReply<T> {
    /// Answer the waiter (a waiter that gave up is fine to miss).
    pub(crate) fn send(self, result: Result<T, StoreError>) {
        let _ = self.tx.send(result);
    }
}

/// A connected [`CommitReply`] and [`Committing`].
pub(crate) fn committing<T>() -> (CommitReply<T>, Committing<T>) {
    let (tx, rx) = oneshot::channel();
    (CommitReply { tx }, Committing { rx })
}

impl<T: Send + 'static> Committing<T> {
    /// Wait until the write is durable.
    pub(crate) async fn wait(self) -> Result<T, StoreError> {
        match self.rx.await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(
                "the storage write pipeline stopped".into(),
            )),
        }
    }

    /// Like [`Committing::wait`], and keep `hold` (a group's lock) until the
    /// write is durable or failed, even if the waiting request is cancelled
    /// meanwhile: whoever takes the lock next reads only settled state.
    pub(crate) async fn wait_holding<H: Send + 'static>(self, hold: H) -> Result<T, StoreError> {
        let task = tokio::spawn(async move {
            let result = self.wait().await;
            drop(hold);
            result
        });
        match task.await {
            Ok(result) => result,
            Err(e) => Err(StoreError::Unavailable(format!(
                "waiting for durability failed: {e}"
            ))),
        }
    }
}
