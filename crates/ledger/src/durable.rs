//! Durability as callers see it: a result handed out at once, acknowledged only once the commit
//! that holds its changes is durable ([`Durable`]), whether the caller blocks ([`Durable::wait`])
//! or awaits it. A [`Tracker`] numbers changes as they are queued and says which are durable,
//! which failed, and which were lost to a failed commit; a writer advances it.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::{Condvar, Mutex};

use crate::error::LedgerError;

/// Which queued changes are durable.
#[derive(Default)]
pub(crate) struct Tracker {
    state: Mutex<Tracked>,
    changed: Condvar,
}

#[derive(Default)]
struct Tracked {
    /// Every change numbered up to this is durable (or, if in `lost`, never will be).
    seq: u64,
    failure: Option<String>,
    /// Async waiters: woken when `seq` reaches theirs (or on failure).
    wakers: Vec<(u64, Waker)>,
    /// The changes a failed commit lost, as ranges of sequence numbers `(after, up_to]`: decided
    /// in memory, never durable, and dropped when their writer recovered in place.
    lost: Vec<(u64, u64)>,
}

impl Tracked {
    /// Whether the change numbered `seq` is durable (`Some(Ok)`), will never be (`Some(Err)`),
    /// or is still on its way (`None`).
    fn outcome(&self, seq: u64) -> Option<Result<(), LedgerError>> {
        if self
            .lost
            .iter()
            .any(|(after, up_to)| *after < seq && seq <= *up_to)
        {
            return Some(Err(LedgerError::Unavailable {
                reason: "a commit to the store failed, and this change with it".to_string(),
            }));
        }
        if self.seq >= seq {
            return Some(Ok(()));
        }
        self.failure.as_ref().map(|failure| {
            Err(LedgerError::Unavailable {
                reason: failure.clone(),
            })
        })
    }
}

impl Tracker {
    /// Blocks until the change numbered `seq` is durable, or cannot be.
    pub(crate) fn wait(&self, seq: u64) -> Result<(), LedgerError> {
        let mut tracked = self.state.lock();
        loop {
            if let Some(outcome) = tracked.outcome(seq) {
                return outcome;
            }
            self.changed.wait(&mut tracked);
        }
    }

    /// Every change up to `seq` is durable: wakes whoever waits on one.
    pub(crate) fn advance(&self, seq: u64) {
        let ready: Vec<Waker> = {
            let mut tracked = self.state.lock();
            tracked.seq = tracked.seq.max(seq);
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut tracked.wakers)
                .into_iter()
                .partition(|(waiting_for, _)| *waiting_for <= seq);
            tracked.wakers = waiting;
            ready.into_iter().map(|(_, waker)| waker).collect()
        };
        self.changed.notify_all();
        for waker in ready {
            waker.wake();
        }
    }

    /// A commit failed: every change not yet durable fails, and so does every later one, until
    /// [`Tracker::reopen`].
    pub(crate) fn fail(&self, reason: String) {
        let wakers = {
            let mut tracked = self.state.lock();
            tracked.failure = Some(reason);
            std::mem::take(&mut tracked.wakers)
        };
        self.changed.notify_all();
        for (_, waker) in wakers {
            waker.wake();
        }
    }

    /// After a failure, once the writer has reloaded: the changes numbered after the last
    /// durable one, up to `seq_last`, are lost for good; later ones are tracked again.
    pub(crate) fn reopen(&self, seq_last: u64) {
        let mut tracked = self.state.lock();
        if seq_last > tracked.seq {
            let after = tracked.seq;
            tracked.lost.push((after, seq_last));
        }
        tracked.seq = tracked.seq.max(seq_last);
        tracked.failure = None;
    }
}

/// A result whose changes are queued for the store; [`Durable::wait`] returns it once they are
/// durable. Dropping it without waiting leaves the changes queued; they are written all the same.
#[must_use = "wait() for durability before acknowledging"]
pub struct Durable<T> {
    value: T,
    seq: u64,
    tracker: Arc<Tracker>,
}

impl<T: std::fmt::Debug> std::fmt::Debug for Durable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("value", &self.value)
            .field("seq", &self.seq)
            .finish()
    }
}

impl<T> Durable<T> {
    pub(crate) fn new(value: T, seq: u64, tracker: Arc<Tracker>) -> Durable<T> {
        Durable {
            value,
            seq,
            tracker,
        }
    }

    /// Blocks until the changes are durable.
    pub fn wait(self) -> Result<T, LedgerError> {
        self.tracker.wait(self.seq)?;
        Ok(self.value)
    }

    /// The result, before it is durable: for callers that will wait some other way.
    pub fn peek(&self) -> &T {
        &self.value
    }
}

/// Awaiting a [`Durable`] waits for the same commit as [`Durable::wait`], without blocking a
/// thread: the writer wakes the task when the commit is durable.
impl<T: Unpin> IntoFuture for Durable<T> {
    type Output = Result<T, LedgerError>;
    type IntoFuture = DurableFuture<T>;

    fn into_future(self) -> DurableFuture<T> {
        DurableFuture {
            value: Some(self.value),
            seq: self.seq,
            tracker: self.tracker,
        }
    }
}

/// The future of a [`Durable`]: ready when its commit is durable.
pub struct DurableFuture<T> {
    value: Option<T>,
    seq: u64,
    tracker: Arc<Tracker>,
}

impl<T: Unpin> Future for DurableFuture<T> {
    type Output = Result<T, LedgerError>;

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let mut tracked = self.tracker.state.lock();
        match tracked.outcome(self.seq) {
            Some(Ok(())) => {
                drop(tracked);
                match self.value.take() {
                    Some(value) => Poll::Ready(Ok(value)),
                    None => Poll::Ready(Err(LedgerError::Unavailable {
                        reason: "a durable result was awaited twice".to_string(),
                    })),
                }
            }
            Some(Err(error)) => Poll::Ready(Err(error)),
            None => {
                tracked.wakers.push((self.seq, context.waker().clone()));
                Poll::Pending
            }
        }
    }
}
