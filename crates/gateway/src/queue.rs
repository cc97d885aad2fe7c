//! The fair-share queue in front of each model: the async side of `stipend_fairshare`.
//!
//! A request that has its reservation calls [`FairQueue::enter`]. When a slot is free and
//! nobody waits it runs at once; otherwise it waits until the scheduler picks it (the payer with
//! the least service first), its wait runs out (`queue_wait_max`), or its client leaves. What it
//! gets is a [`Place`]: its slot, charged as service is delivered and freed when it ends, which
//! admits the next request. Every path out frees the slot exactly once, and a request that
//! leaves the queue leaves before anything ran, so its caller voids its reservation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stipend_fairshare::{Arrival, Limits, Payer, Rejection, Scheduler, Ticket};
use tokio::sync::oneshot;

use crate::error::ApiError;

/// The queue's bounds, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// Requests one person (or pool) may have waiting for one model.
    pub queue_depth_max_per_person: usize,
    /// Requests waiting for one model in all.
    pub queue_depth_max: usize,
    /// The longest a request waits for a slot.
    pub queue_wait_max: Duration,
}

impl Default for QueueOptions {
    fn default() -> QueueOptions {
        QueueOptions {
            queue_depth_max_per_person: 64,
            queue_depth_max: 1_024,
            queue_wait_max: Duration::from_secs(60),
        }
    }
}

/// Wait-time histogram bounds, in seconds.
pub const WAIT_BUCKETS_S: [f64; 10] = [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 10.0, 60.0];

/// The queue's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Turned away, by reason: person's queue full, queue full, waited too long.
    pub rejected: [AtomicU64; 3],
    /// Admissions whose wait was at most each bound (cumulative buckets).
    pub wait_buckets: [AtomicU64; WAIT_BUCKETS_S.len()],
    /// Total wait of admitted requests, in µs.
    pub wait_sum_us: AtomicU64,
    /// Admitted requests.
    pub admitted: AtomicU64,
}

impl QueueCounters {
    fn reject(&self, reason: Rejection) {
        self.rejected[rejection_index(reason)].fetch_add(1, Ordering::Relaxed);
    }

    fn admitted_after(&self, waited: Duration) {
        let seconds = waited.as_secs_f64();
        for (bucket, bound) in self.wait_buckets.iter().zip(WAIT_BUCKETS_S) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.wait_sum_us
            .fetch_add(waited.as_micros() as u64, Ordering::Relaxed);
        self.admitted.fetch_add(1, Ordering::Relaxed);
    }
}

/// The reasons, in the order of [`QueueCounters::rejected`].
pub const REJECTIONS: [Rejection; 3] = [
    Rejection::PersonQueueFull,
    Rejection::QueueFull,
    Rejection::WaitTooLong,
];

fn rejection_index(reason: Rejection) -> usize {
    REJECTIONS
        .iter()
        .position(|known| *known == reason)
        .unwrap_or(0)
}

/// What a waiting request is told.
enum Admission {
    Run,
    Expired,
    Closed,
}

struct State {
    scheduler: Scheduler,
    waiters: rustc_hash::FxHashMap<Ticket, oneshot::Sender<Admission>>,
    /// The server is stopping: nobody new waits.
    closed: bool,
}

impl State {
    /// Tells admitted tickets to run. One whose waiter is gone frees its slot at once, which may
    /// admit others in turn.
    fn wake(&mut self, mut admitted: Vec<Ticket>) {
        while let Some(ticket) = admitted.pop() {
            let delivered = self
                .waiters
                .remove(&ticket)
                .is_some_and(|waiter| waiter.send(Admission::Run).is_ok());
            if !delivered {
                admitted.extend(self.scheduler.finish(ticket, 0));
            }
        }
    }

    fn expire(&mut self, now_ms: u64, counters: &QueueCounters) {
        for ticket in self.scheduler.expire(now_ms) {
            counters.reject(Rejection::WaitTooLong);
            if let Some(waiter) = self.waiters.remove(&ticket) {
                let _ = waiter.send(Admission::Expired);
            }
        }
    }
}

/// One model's fair-share queue.
pub struct FairQueue {
    state: Mutex<State>,
    options: QueueOptions,
    epoch: Instant,
    /// Its counters.
    pub counters: QueueCounters,
}

impl FairQueue {
    /// A queue in front of `capacity` slots.
    pub fn new(capacity: usize, options: QueueOptions) -> FairQueue {
        FairQueue {
            state: Mutex::new(State {
                scheduler: Scheduler::new(Limits {
                    capacity,
                    queue_depth_max_per_person: options.queue_depth_max_per_person,
                    queue_depth_max: options.queue_depth_max,
                    queue_wait_max_ms: options.queue_wait_max.as_millis() as u64,
                }),
                waiters: rustc_hash::FxHashMap::default(),
                closed: false,
            }),
            options,
            epoch: Instant::now(),
            counters: QueueCounters::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Requests running and waiting.
    pub fn load(&self) -> (usize, usize) {
        let state = self.state.lock();
        (state.scheduler.running(), state.scheduler.waiting())
    }

    /// Where `payer`'s oldest waiting request stands (1: next), if it has one waiting.
    pub fn position(&self, payer: Payer) -> Option<usize> {
        self.state.lock().scheduler.position(payer)
    }

    /// The server is stopping: every waiting request is refused now (503, nothing charged) and
    /// none waits from here on; running ones finish.
    pub fn close(&self) {
        let mut state = self.state.lock();
        state.closed = true;
        for ticket in state.scheduler.drain() {
            if let Some(waiter) = state.waiters.remove(&ticket) {
                let _ = waiter.send(Admission::Closed);
            }
        }
    }

    fn refused(&self, reason: Rejection) -> ApiError {
        ApiError::RateLimited {
            reason,
            retry_after_s: match reason {
                Rejection::WaitTooLong => self.options.queue_wait_max.as_secs().clamp(1, 60),
                Rejection::PersonQueueFull | Rejection::QueueFull => 1,
            },
        }
    }

    /// Waits for a slot for `payer`, whose request's prompt costs `prompt_cu` (charged to its
    /// counter when it is admitted). Dropping the returned future while it waits leaves the
    /// queue (and frees the slot if it had just been given one).
    pub async fn enter(
        self: &Arc<FairQueue>,
        payer: Payer,
        prompt_cu: u64,
    ) -> Result<Place, ApiError> {
        let arrived = Instant::now();
        let (ticket, admission) = {
            let mut state = self.state.lock();
            if state.closed {
                return Err(shutting_down());
            }
            let now = self.now_ms();
            state.expire(now, &self.counters);
            match state.scheduler.arrive(payer, 1, prompt_cu, now) {
                Arrival::Admitted(ticket) => {
                    self.counters.admitted_after(Duration::ZERO);
                    return Ok(Place::new(Arc::clone(self), ticket));
                }
                Arrival::Queued(ticket) => {
                    let (sender, receiver) = oneshot::channel();
                    state.waiters.insert(ticket, sender);
                    (ticket, receiver)
                }
                Arrival::Rejected(reason) => {
                    self.counters.reject(reason);
                    return Err(self.refused(reason));
                }
            }
        };
        let mut waiting = Waiting {
            queue: Arc::clone(self),
            ticket,
            armed: true,
        };
        let mut admission = admission;
        let outcome = tokio::time::timeout(self.options.queue_wait_max, &mut admission).await;
        let run = match outcome {
            Ok(Ok(Admission::Run)) => true,
            Ok(Ok(Admission::Expired)) => false,
            Ok(Ok(Admission::Closed)) => {
                waiting.armed = false;
                return Err(shutting_down());
            }
            Ok(Err(_)) => return Err(ApiError::Internal),
            Err(_) => {
                // Our own deadline: expire everything overdue (this request included), unless
                // a slot was given to it in the meantime.
                let mut state = self.state.lock();
                state.expire(self.now_ms(), &self.counters);
                if state.scheduler.cancel(ticket) {
                    state.waiters.remove(&ticket);
                    self.counters.reject(Rejection::WaitTooLong);
                }
                drop(state);
                matches!(admission.try_recv(), Ok(Admission::Run))
            }
        };
        waiting.armed = false;
        if run {
            self.counters.admitted_after(arrived.elapsed());
            Ok(Place::new(Arc::clone(self), ticket))
        } else {
            Err(self.refused(Rejection::WaitTooLong))
        }
    }
}

fn shutting_down() -> ApiError {
    ApiError::Overloaded(
        "The server is shutting down; try again shortly. Nothing was charged.".to_string(),
    )
}

/// A request waiting in the queue; if its future is dropped (the client left), it leaves.
struct Waiting {
    queue: Arc<FairQueue>,
    ticket: Ticket,
    armed: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut state = self.queue.state.lock();
        state.waiters.remove(&self.ticket);
        if !state.scheduler.cancel(self.ticket) {
            // It had just been given a slot: give it to the next.
            let admitted = state.scheduler.finish(self.ticket, 0);
            state.wake(admitted);
        }
    }
}

/// A slot held by a running request: charged as service is delivered, freed when it ends (or
/// when it is dropped), which admits the next request.
pub struct Place {
    queue: Arc<FairQueue>,
    ticket: Ticket,
    charged_cu: AtomicU64,
    finished: bool,
}

impl Place {
    fn new(queue: Arc<FairQueue>, ticket: Ticket) -> Place {
        Place {
            queue,
            ticket,
            charged_cu: AtomicU64::new(0),
            finished: false,
        }
    }

    /// Service delivered (completion tokens as they stream).
    pub fn charge(&self, cu: u64) {
        if cu == 0 {
            return;
        }
        self.charged_cu.fetch_add(cu, Ordering::Relaxed);
        self.queue.state.lock().scheduler.charge(self.ticket, cu);
    }

    /// Ends the request at its exact cost and frees the slot.
    pub fn finish(mut self, total_cu: u64) {
        self.release(total_cu);
    }

    fn release(&mut self, total_cu: u64) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let mut state = self.queue.state.lock();
        let admitted = state.scheduler.finish(self.ticket, total_cu);
        state.wake(admitted);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        // Ended without a cost (an error, a cut-off): what was charged as it went stands.
        let charged = self.charged_cu.load(Ordering::Relaxed);
        self.release(charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(capacity: usize, wait: Duration) -> Arc<FairQueue> {
        Arc::new(FairQueue::new(
            capacity,
            QueueOptions {
                queue_depth_max_per_person: 2,
                queue_depth_max: 3,
                queue_wait_max: wait,
            },
        ))
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_least_served_and_leaving_frees_it() {
        let queue = queue(1, Duration::from_secs(60));
        let first = queue.enter(1, 100).await.unwrap();
        let enter = |payer: Payer| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.enter(payer, 10).await })
        };
        let a = enter(1);
        while queue.load().1 < 1 {
            tokio::task::yield_now().await;
        }
        let b = enter(2);
        while queue.load().1 < 2 {
            tokio::task::yield_now().await;
        }
        // 2 arrived last but has been served less (lifted to the floor, and nothing running).
        assert_eq!(queue.position(2), Some(1));
        assert_eq!(queue.position(1), Some(2));
        // A third waits, then its client hangs up: it leaves the queue.
        let c = enter(3);
        while queue.load().1 < 3 {
            tokio::task::yield_now().await;
        }
        c.abort();
        assert!(c.await.is_err());
        assert_eq!(queue.load(), (1, 2));
        // The slot frees: 2 gets it; 1 still waits.
        first.finish(100);
        let b = b.await.unwrap().unwrap();
        assert_eq!(queue.load(), (1, 1));
        assert!(!a.is_finished());
        // 2's request ends (dropped: an error path): 1 gets the slot.
        drop(b);
        let a = a.await.unwrap().unwrap();
        assert_eq!(queue.load(), (1, 0));
        a.finish(10);
        assert_eq!(queue.load(), (0, 0));
        assert_eq!(queue.counters.admitted.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn closing_refuses_the_waiting_and_the_new() {
        let queue = queue(1, Duration::from_secs(60));
        let running = queue.enter(1, 1).await.unwrap();
        let waiter = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.enter(2, 1).await.map(|_| ()) })
        };
        while queue.load().1 < 1 {
            tokio::task::yield_now().await;
        }
        queue.close();
        assert!(matches!(
            waiter.await.unwrap(),
            Err(ApiError::Overloaded(_))
        ));
        assert!(matches!(
            queue.enter(3, 1).await.err(),
            Some(ApiError::Overloaded(_))
        ));
        assert_eq!(queue.load(), (1, 0));
        running.finish(1);
        assert_eq!(queue.load(), (0, 0));
    }

    #[tokio::test]
    async fn bounds_refuse_with_rate_limit_errors() {
        let queue = queue(1, Duration::from_millis(50));
        let running = queue.enter(1, 1).await.unwrap();
        let waiting: Vec<_> = (0..2)
            .map(|_| {
                let queue = Arc::clone(&queue);
                tokio::spawn(async move { queue.enter(2, 1).await.map(|_| ()) })
            })
            .collect();
        while queue.load().1 < 2 {
            tokio::task::yield_now().await;
        }
        let error = queue.enter(2, 1).await.err().unwrap();
        assert!(matches!(
            error,
            ApiError::RateLimited {
                reason: Rejection::PersonQueueFull,
                ..
            }
        ));
        // Both waiters time out: 429 after queue_wait_max, and they leave the queue.
        for waiter in waiting {
            let error = waiter.await.unwrap().unwrap_err();
            assert!(matches!(
                error,
                ApiError::RateLimited {
                    reason: Rejection::WaitTooLong,
                    ..
                }
            ));
        }
        assert_eq!(queue.load(), (1, 0));
        drop(running);
        assert_eq!(queue.load(), (0, 0));
        assert_eq!(queue.counters.rejected[2].load(Ordering::Relaxed), 2);
    }
}
