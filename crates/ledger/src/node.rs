//! A node of several sharing one database: reservations decided in memory against leases.
//!
//! A [`Node`] holds leases on people's balances (see [`escrow`](crate::escrow)) and decides each
//! reservation against what its lease on that person still has free, under one lock, as the
//! single-node [`Ledger`](crate::Ledger) does against the whole balance. Only when a lease runs
//! short does it ask the database for another, sized as a fraction of what is available (so a
//! person with an ample balance costs about one database write per many calls, and the leases
//! shrink as the balance falls), and never less than the call needs (so a person can spend down
//! to the last cu through any node). Settles are queued and committed many to a transaction by
//! the node's writer, and acknowledged ([`Durable`]) only once committed.
//!
//! Time: a lease lives `ttl` by the database's clock. The node counts it from a moment taken
//! before it asked, by its own monotonic clock, and stops deciding on it `margin` before that
//! ends. Leases in use are renewed well before their end, so a call may run longer than a
//! lease's life; idle ones go back; at shutdown all go back. A node that is killed leaves its
//! leases to expire, and any node reclaims them. A node that cannot renew a lease in use (the
//! database away, or too slow) keeps trying until `settle_ahead` before the lease's deadline;
//! the calls on it are then cut short ([`Node::hold_until`]) and settled while the lease still
//! lives, charged what they delivered. One paused past a lease's life finds it fenced, and its
//! settles are charged against what is available instead (see [`SpendOutcome`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::account::{AccountId, AccountRecord};
use crate::clock::Clock;
use crate::durable::{Durable, Tracker};
use crate::error::LedgerError;
use crate::escrow::{Lease, LeaseSpend, SpendOutcome, bring_up_to_date};
use crate::ledger::{AccountView, WriterStats};
use crate::limits::{AVAILABLE_HINTS_MAX, COMMIT_CHECK_TIME, EDGE_CALLS};
use crate::policy::StipendPolicy;
use crate::reservation::{Reservation, ReservationId, Settlement};
use crate::store::StoreError;
use crate::transfer::{Transfer, TransferId, TransferKind};

/// What a node needs of the shared database (the PostgreSQL store implements it).
pub trait EscrowStore: Send + Sync {
    /// Takes a lease of up to `want_cu`, at least `min_cu`, of the account's available balance
    /// (applying its due stipends first), or `None` if less than `min_cu` is available.
    fn take_lease(
        &self,
        account: AccountId,
        want_cu: u64,
        min_cu: u64,
        now_ms: i64,
    ) -> Result<Option<Lease>, StoreError>;
    /// Renews a lease for another `ttl`; false if it had already expired.
    fn renew_lease(&self, lease: i64) -> Result<bool, StoreError>;
    /// Gives a lease back.
    fn release_lease(&self, lease: i64) -> Result<u64, StoreError>;
    /// Gives `amount_cu` of a lease back, keeping the rest; false if it no longer held that much.
    fn shrink_lease(&self, lease: i64, amount_cu: u64) -> Result<bool, StoreError>;
    /// Commits spends decided against leases, in one transaction.
    fn settle_leased(&self, spends: &[LeaseSpend]) -> Result<Vec<SpendOutcome>, StoreError>;
    /// Gives back every expired lease, whoever held it.
    fn reclaim_expired_leases(&self) -> Result<u64, StoreError>;
    /// Whether the settle batch whose first spend is `first` was committed: asked when a
    /// commit's acknowledgement was lost.
    fn settled(&self, first: TransferId) -> Result<bool, StoreError>;
    /// An account's row and what leases hold of it.
    fn account_held(&self, id: AccountId) -> Result<Option<(AccountRecord, u64)>, StoreError>;
    /// How long a lease lives without renewal.
    fn lease_ttl(&self) -> Duration;
}

/// A node's limits and timings.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The stipend policy (for views: what is due, when the next stipend comes).
    pub policy: StipendPolicy,
    /// The issuer's account (stipends come from it).
    pub issuer: AccountId,
    /// How long before a lease could expire the node stops deciding on it.
    pub lease_margin: Duration,
    /// How long before that the calls on a lease that could not be renewed are cut, so that
    /// their settles are committed while it lives.
    pub settle_ahead: Duration,
    /// A lease unused this long goes back.
    pub idle_return: Duration,
    /// A new lease is this fraction of what is available (1/`lease_divisor`), and at least what
    /// the call needs.
    pub lease_divisor: u64,
    /// The longest a reservation may stay open.
    pub reservation_timeout_max: Duration,
    /// The most spends committed in one transaction.
    pub commit_batch_max: usize,
    /// How often the node renews, returns and reclaims leases.
    pub tick: Duration,
}

impl NodeOptions {
    /// The defaults for a lease time-to-live of `ttl`.
    pub fn new(policy: StipendPolicy, issuer: AccountId, ttl: Duration) -> NodeOptions {
        NodeOptions {
            policy,
            issuer,
            lease_margin: (ttl / 5).max(Duration::from_millis(50)),
            settle_ahead: (ttl / 5).max(Duration::from_millis(50)),
            idle_return: (ttl / 3).max(Duration::from_millis(100)),
            lease_divisor: 10,
            reservation_timeout_max: crate::limits::RESERVATION_TIMEOUT_MAX_DEFAULT,
            commit_batch_max: 4_096,
            tick: (ttl / 10).clamp(Duration::from_millis(10), Duration::from_millis(500)),
        }
    }
}

struct LeaseState {
    account: AccountId,
    /// Neither reserved nor spent.
    free_cu: u64,
    reserved_cu: u64,
    /// Settled and not yet committed: the lease must stay in the database until it is, or the
    /// spend would find it gone.
    pending_cu: u64,
    /// Taken when the person had little left (the lease covers fewer than [`EDGE_CALLS`] such
    /// calls): given back as soon as it is idle, so that what is left is not parked on one node
    /// while another is asked for it.
    at_the_edge: bool,
    /// When the node stops deciding on it (by its monotonic clock).
    deadline: Instant,
    last_used: Instant,
}

/// The leases a node holds, found by id and by account: a reserve looks at its person's leases
/// only, so its cost does not grow with how many people the node serves, nor does the look
/// after every commit at the leases taken at the edge of a balance.
#[derive(Default)]
struct Leases {
    by_id: FxHashMap<i64, LeaseState>,
    by_account: FxHashMap<AccountId, Vec<i64>>,
    at_the_edge: FxHashSet<i64>,
}

impl Leases {
    fn insert(&mut self, id: i64, lease: LeaseState) {
        self.by_account.entry(lease.account).or_default().push(id);
        if lease.at_the_edge {
            self.at_the_edge.insert(id);
        }
        self.by_id.insert(id, lease);
    }

    fn get(&self, id: i64) -> Option<&LeaseState> {
        self.by_id.get(&id)
    }

    fn get_mut(&mut self, id: i64) -> Option<&mut LeaseState> {
        self.by_id.get_mut(&id)
    }

    fn remove(&mut self, id: i64) -> Option<LeaseState> {
        let lease = self.by_id.remove(&id)?;
        self.unindex(id, lease.account);
        Some(lease)
    }

    /// Keeps the leases for which `keep` says so (it may change them on the way).
    fn retain(&mut self, mut keep: impl FnMut(i64, &mut LeaseState) -> bool) {
        let mut dropped = Vec::new();
        self.by_id.retain(|id, lease| {
            let kept = keep(*id, lease);
            if !kept {
                dropped.push((*id, lease.account));
            }
            kept
        });
        for (id, account) in dropped {
            self.unindex(id, account);
        }
    }

    fn unindex(&mut self, id: i64, account: AccountId) {
        self.at_the_edge.remove(&id);
        if let Some(ids) = self.by_account.get_mut(&account) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_account.remove(&account);
            }
        }
    }

    /// The leases on `account`.
    fn of(&self, account: AccountId) -> impl Iterator<Item = (i64, &LeaseState)> {
        self.by_account
            .get(&account)
            .into_iter()
            .flatten()
            .filter_map(|id| Some((*id, self.by_id.get(id)?)))
    }

    /// The ids of the leases taken at the edge of a balance.
    fn at_the_edge(&self) -> impl Iterator<Item = i64> {
        self.at_the_edge.iter().copied()
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Forgets every lease, returning their ids.
    fn take_all(&mut self) -> Vec<i64> {
        let ids = self.by_id.keys().copied().collect();
        self.clear();
        ids
    }

    fn clear(&mut self) {
        *self = Leases::default();
    }
}

struct NodeState {
    leases: Leases,
    reservations: FxHashMap<ReservationId, (Reservation, i64)>,
    /// What was available after the last lease taken for each account: the next lease's size.
    available_hint: HashMap<AccountId, u64>,
    queue: Vec<(u64, LeaseSpend)>,
    seq_last: u64,
    reservation_prefix: u64,
    reservation_counter: u64,
    transfer_prefix: u64,
    transfer_counter: u64,
    shutdown: bool,
    /// Stop without giving leases back: what a killed process leaves behind.
    abandon: bool,
    /// The writer does nothing until then (tests of a paused process).
    paused_until: Option<Instant>,
    failure: Option<String>,
}

impl NodeState {
    fn next_transfer_id(&mut self) -> TransferId {
        self.transfer_counter += 1;
        TransferId((u128::from(self.transfer_prefix) << 64) | u128::from(self.transfer_counter))
    }

    /// A lease of `account`'s with at least `amount_cu` free that will still be live at
    /// `until`.
    fn lease_with(&self, account: AccountId, amount_cu: u64, until: Instant) -> Option<i64> {
        self.leases
            .of(account)
            .find(|(_, lease)| lease.free_cu >= amount_cu && lease.deadline > until)
            .map(|(id, _)| id)
    }
}

struct Shared {
    state: Mutex<NodeState>,
    work: Condvar,
    tracker: Arc<Tracker>,
    store: Arc<dyn EscrowStore>,
    clock: Arc<dyn Clock>,
    options: NodeOptions,
    stats: Mutex<WriterStats>,
}

/// A node sharing a database's balances with others through leases.
pub struct Node {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Node {
    /// Starts a node on the shared database.
    pub fn open(
        store: Arc<dyn EscrowStore>,
        clock: Arc<dyn Clock>,
        options: NodeOptions,
    ) -> Result<Node, LedgerError> {
        if options.lease_margin + options.settle_ahead >= store.lease_ttl() / 2 {
            return Err(LedgerError::InvalidTimeout {
                reason: "the lease margin and the settle time must be shorter than half the lease's life"
                    .to_string(),
            });
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(NodeState {
                leases: Leases::default(),
                reservations: FxHashMap::default(),
                available_hint: HashMap::new(),
                queue: Vec::new(),
                seq_last: 0,
                reservation_prefix: crate::transfer::random_u64(),
                reservation_counter: 0,
                transfer_prefix: crate::transfer::random_u64(),
                transfer_counter: 0,
                shutdown: false,
                abandon: false,
                paused_until: None,
                failure: None,
            }),
            work: Condvar::new(),
            tracker: Arc::new(Tracker::default()),
            store,
            clock,
            options,
            stats: Mutex::new(WriterStats::default()),
        });
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("escrow-writer".to_string())
            .spawn(move || run_writer(&writer_shared))
            .map_err(|error| LedgerError::Unavailable {
                reason: format!("cannot start the node's writer: {error}"),
            })?;
        Ok(Node {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Reserves `amount_cu` of `account`'s balance for a call to `sink`, against a lease of
    /// this node's (taking one if none has enough free).
    pub fn reserve(
        &self,
        account: AccountId,
        sink: AccountId,
        amount_cu: u64,
        timeout: Duration,
    ) -> Result<Reservation, LedgerError> {
        let shared = &self.shared;
        crate::ledger::check_amount(amount_cu)?;
        crate::ledger::check_timeout(timeout, shared.options.reservation_timeout_max)?;
        // A lease must outlive the decision by a moment; a few tries: the lease just taken may
        // have been reserved away by a concurrent call before this one got to it, and expired
        // leases may be given back on the way.
        let mut reclaimed = false;
        for _ in 0..3 {
            {
                let mut state = shared.state.lock();
                if let Some(failure) = &state.failure {
                    return Err(LedgerError::Unavailable {
                        reason: failure.clone(),
                    });
                }
                if state.shutdown {
                    return Err(LedgerError::Unavailable {
                        reason: "the node is shutting down".to_string(),
                    });
                }
                let now = Instant::now();
                if let Some(reservation) =
                    shared.reserve_on(&mut state, account, sink, amount_cu, timeout, now)
                {
                    return Ok(reservation);
                }
            }
            // What this node's leases on the account have free, spread too thin for the call,
            // goes back first, so that the new lease can be made of it: a person can spend down
            // to the last cu through one node, however the leases were cut before.
            self.give_back_free(account);
            let want = {
                let state = shared.state.lock();
                let hint = state.available_hint.get(&account).copied().unwrap_or(0);
                amount_cu.max(hint / shared.options.lease_divisor.max(1))
            };
            let asked_at = Instant::now();
            let lease = shared
                .store
                .take_lease(account, want, amount_cu, shared.clock.now_ms())?;
            let Some(lease) = lease else {
                // What a dead node held may be past its life and not yet given back: give back
                // every expired lease and ask once more, before saying the person has too little.
                if !reclaimed && shared.store.reclaim_expired_leases()? > 0 {
                    reclaimed = true;
                    continue;
                }
                return Err(self.insufficient(account, amount_cu));
            };
            let mut state = shared.state.lock();
            // One hint per person served; forgotten wholesale past a bound, as a cache is (a
            // person's next lease is then sized as a first one).
            if state.available_hint.len() >= AVAILABLE_HINTS_MAX {
                state.available_hint.clear();
            }
            state.available_hint.insert(account, lease.available_cu);
            state.leases.insert(
                lease.id,
                LeaseState {
                    account,
                    free_cu: lease.granted_cu,
                    reserved_cu: 0,
                    pending_cu: 0,
                    at_the_edge: want < amount_cu.saturating_mul(EDGE_CALLS),
                    deadline: asked_at + lease.ttl.saturating_sub(shared.options.lease_margin),
                    last_used: asked_at,
                },
            );
            if let Some(reservation) = shared.reserve_on(
                &mut state,
                account,
                sink,
                amount_cu,
                timeout,
                Instant::now(),
            ) {
                return Ok(reservation);
            }
        }
        Err(self.insufficient(account, amount_cu))
    }

    /// Gives back what this node's leases on `account` have free: whole leases with nothing
    /// reserved, and the free part of the others.
    fn give_back_free(&self, account: AccountId) {
        let shared = &self.shared;
        let (release, shrink): (Vec<i64>, Vec<(i64, u64)>) = {
            let mut state = shared.state.lock();
            let mut release = Vec::new();
            let mut shrink = Vec::new();
            let ids: Vec<i64> = state.leases.of(account).map(|(id, _)| id).collect();
            for id in ids {
                let Some(lease) = state.leases.get_mut(id) else {
                    continue;
                };
                if lease.free_cu == 0 {
                    continue;
                }
                if lease.reserved_cu == 0 && lease.pending_cu == 0 {
                    state.leases.remove(id);
                    release.push(id);
                } else {
                    shrink.push((id, lease.free_cu));
                    lease.free_cu = 0;
                }
            }
            (release, shrink)
        };
        for id in release {
            if let Err(error) = shared.store.release_lease(id) {
                tracing::warn!(%error, lease = id, "a lease could not be given back; it will expire");
            }
        }
        for (id, free_cu) in shrink {
            if let Err(error) = shared.store.shrink_lease(id, free_cu) {
                tracing::warn!(%error, lease = id, "a lease's free part could not be given back");
            }
        }
    }

    fn insufficient(&self, account: AccountId, needed_cu: u64) -> LedgerError {
        let view = self.view(account).ok();
        LedgerError::InsufficientBalance {
            account,
            needed_cu,
            available_cu: view.as_ref().map_or(0, |view| view.available_cu),
            next_grant_at_ms: view.and_then(|view| view.next_grant_at_ms),
        }
    }

    /// Charges `actual_cu` of a reservation (at most what it holds; the rest is reported as a
    /// shortfall) and gives the rest back to its lease. Acknowledged once committed.
    pub fn settle(
        &self,
        id: ReservationId,
        actual_cu: u64,
    ) -> Result<Durable<Settlement>, LedgerError> {
        let shared = &self.shared;
        let mut state = shared.state.lock();
        if let Some(failure) = &state.failure {
            return Err(LedgerError::Unavailable {
                reason: failure.clone(),
            });
        }
        let (reservation, lease_id) = state
            .reservations
            .remove(&id)
            .ok_or(LedgerError::UnknownReservation { id })?;
        let charged_cu = actual_cu.min(reservation.amount_cu);
        // A lease past this node's own deadline (the node was paused, or starved, past it) may
        // be gone from the database: the spend is then committed at once, on its own, and the
        // result says what was charged, never more.
        let now = Instant::now();
        let fenced = state
            .leases
            .get(lease_id)
            .is_none_or(|lease| lease.deadline <= now);
        if let Some(lease) = state.leases.get_mut(lease_id) {
            lease.reserved_cu -= reservation.amount_cu;
            if fenced {
                lease.free_cu = 0;
            } else {
                lease.free_cu += reservation.amount_cu - charged_cu;
                lease.pending_cu += charged_cu;
            }
            lease.last_used = now;
        }
        let mut settlement = Settlement {
            reservation: id,
            charged_cu,
            shortfall_cu: actual_cu - charged_cu,
            released_cu: reservation.amount_cu - charged_cu,
            transfer: None,
        };
        if charged_cu == 0 {
            return Ok(Durable::new(settlement, 0, Arc::clone(&shared.tracker)));
        }
        let now_ms = shared.clock.now_ms();
        let transfer = Transfer {
            id: state.next_transfer_id(),
            kind: TransferKind::Spend,
            debit: reservation.account,
            credit: reservation.sink,
            amount_cu: charged_cu,
            created_at_ms: now_ms,
            lot_expires_at_ms: None,
            period: Some(shared.options.policy.period_index(now_ms)),
        };
        settlement.transfer = Some(transfer.id);
        if fenced {
            drop(state);
            return self.settle_fenced(settlement, lease_id, transfer);
        }
        state.seq_last += 1;
        let seq = state.seq_last;
        state.queue.push((
            seq,
            LeaseSpend {
                lease: lease_id,
                transfer,
            },
        ));
        drop(state);
        shared.work.notify_one();
        Ok(Durable::new(settlement, seq, Arc::clone(&shared.tracker)))
    }

    /// Commits one spend on a lease past the node's deadline, now, and reports what the
    /// database charged: all of it if the lease was still live there, else only what the person
    /// had available (the rest a shortfall).
    fn settle_fenced(
        &self,
        mut settlement: Settlement,
        lease_id: i64,
        transfer: Transfer,
    ) -> Result<Durable<Settlement>, LedgerError> {
        let shared = &self.shared;
        let outcome = shared.store.settle_leased(&[LeaseSpend {
            lease: lease_id,
            transfer,
        }])?;
        if let Some(SpendOutcome::Unleased { shortfall_cu }) = outcome.first() {
            tracing::warn!(
                lease = lease_id,
                shortfall_cu,
                "a spend on a lease past its deadline was charged what was available"
            );
            settlement.charged_cu -= shortfall_cu;
            settlement.shortfall_cu += shortfall_cu;
            if settlement.charged_cu == 0 {
                settlement.transfer = None;
            }
        }
        Ok(Durable::new(settlement, 0, Arc::clone(&shared.tracker)))
    }

    /// The moment by which a call on reservation `id` must have ended: `settle_ahead` before
    /// the deadline of the lease under it, which each renewal moves on; now if the reservation
    /// or its lease is gone.
    pub fn hold_until(&self, id: ReservationId) -> Instant {
        let state = self.shared.state.lock();
        let now = Instant::now();
        state
            .reservations
            .get(&id)
            .and_then(|(_, lease)| state.leases.get(*lease))
            .and_then(|lease| lease.deadline.checked_sub(self.shared.options.settle_ahead))
            .unwrap_or(now)
    }

    /// Holds the node's writer for `pause`: no commits, no renewals, as a process stopped with
    /// SIGSTOP. For tests of fencing.
    pub fn pause_writer_for_tests(&self, pause: Duration) {
        self.shared.state.lock().paused_until = Some(Instant::now() + pause);
        self.shared.work.notify_all();
    }

    /// Gives a reservation back to its lease, whole.
    pub fn void(&self, id: ReservationId) -> Result<u64, LedgerError> {
        let mut state = self.shared.state.lock();
        let (reservation, lease_id) = state
            .reservations
            .remove(&id)
            .ok_or(LedgerError::UnknownReservation { id })?;
        let mut at_the_edge = false;
        if let Some(lease) = state.leases.get_mut(lease_id) {
            lease.reserved_cu -= reservation.amount_cu;
            lease.free_cu += reservation.amount_cu;
            at_the_edge = lease.at_the_edge;
        }
        drop(state);
        if at_the_edge {
            self.shared.work.notify_one();
        }
        Ok(reservation.amount_cu)
    }

    /// An account as its person sees it through this node: its balance (with what is due
    /// applied), what this node holds reserved of it, and what is available: the balance less
    /// every node's leases, plus what this node's leases still have free.
    pub fn view(&self, id: AccountId) -> Result<AccountView, LedgerError> {
        let shared = &self.shared;
        let (mut record, held_cu) =
            shared
                .store
                .account_held(id)?
                .ok_or_else(|| LedgerError::UnknownAccount {
                    name: id.to_string(),
                })?;
        let now_ms = shared.clock.now_ms();
        let mut counter = 0u128;
        bring_up_to_date(
            &shared.options.policy,
            &mut record,
            held_cu,
            shared.options.issuer,
            now_ms,
            &mut || {
                counter += 1;
                TransferId(counter)
            },
        )
        .map_err(|error| LedgerError::Store(StoreError::Corrupt(error.to_string())))?;
        let (reserved_cu, free_cu, open_reservations) = {
            let state = shared.state.lock();
            let (reserved, free) = state
                .leases
                .of(id)
                .fold((0, 0), |(reserved, free), (_, lease)| {
                    (reserved + lease.reserved_cu, free + lease.free_cu)
                });
            let open = state
                .reservations
                .values()
                .filter(|(reservation, _)| reservation.account == id)
                .count() as u32;
            (reserved, free, open)
        };
        let person = record.kind == crate::account::AccountKind::Person;
        Ok(AccountView {
            id,
            name: record.name,
            kind: record.kind,
            balance_cu: record.balance_cu,
            reserved_cu,
            available_cu: (record.balance_cu.max(0) as u64).saturating_sub(held_cu) + free_cu,
            next_grant_at_ms: person.then(|| shared.options.policy.next_grant_at_ms(now_ms)),
            open_reservations,
            lots: record.lots,
            usage: crate::account::usage_in_period(
                &record.usage,
                shared.options.policy.period_index(now_ms),
            ),
            last_period: crate::account::usage_in_period(
                &record.usage,
                shared.options.policy.period_index(now_ms) - 1,
            ),
            daily: crate::account::usage_by_day(
                &record.usage,
                crate::ledger::first_day_kept(now_ms),
            ),
        })
    }

    /// Waits until every settle queued so far is committed.
    pub fn flush(&self) -> Result<(), LedgerError> {
        let seq = self.shared.state.lock().seq_last;
        self.shared.work.notify_one();
        self.shared.tracker.wait(seq)
    }

    /// The stipend policy.
    pub fn policy(&self) -> &StipendPolicy {
        &self.shared.options.policy
    }

    /// Whether the node decides anything now.
    pub fn check_open(&self) -> Result<(), LedgerError> {
        match &self.shared.state.lock().failure {
            Some(failure) => Err(LedgerError::Unavailable {
                reason: failure.clone(),
            }),
            None => Ok(()),
        }
    }

    /// What its writer has done so far (it writes no checkpoints: the database's rows are kept
    /// by every commit).
    pub fn writer_stats(&self) -> WriterStats {
        *self.shared.stats.lock()
    }

    /// How many reservations are open on this node.
    pub fn open_reservations(&self) -> usize {
        self.shared.state.lock().reservations.len()
    }

    /// How many leases this node holds now.
    pub fn leases_held(&self) -> usize {
        self.shared.state.lock().leases.len()
    }

    /// Stops the node as a killed process would: nothing more is committed and no lease goes
    /// back; they expire in the database. For tests of what the others do then.
    pub fn abandon(self) {
        self.shared.state.lock().abandon = true;
        self.close();
    }

    /// Closes the node: refuses new reservations, commits what is queued and gives every lease
    /// back. Dropping it does the same; this is for a node shared behind an `Arc`.
    pub fn close(&self) {
        self.shared.state.lock().shutdown = true;
        self.shared.work.notify_all();
        let writer = self.writer.lock().take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!("the node's writer panicked");
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    /// Reserves against a lease of `account`'s with enough free, if the node holds one.
    fn reserve_on(
        &self,
        state: &mut NodeState,
        account: AccountId,
        sink: AccountId,
        amount_cu: u64,
        timeout: Duration,
        now: Instant,
    ) -> Option<Reservation> {
        let lease_id = state.lease_with(account, amount_cu, now)?;
        let lease = state.leases.get_mut(lease_id)?;
        lease.free_cu -= amount_cu;
        lease.reserved_cu += amount_cu;
        lease.last_used = now;
        // The lease is renewed while the reservation is open (the writer renews leases in use
        // past half their life), so a call may run longer than a lease's life.
        let life = timeout;
        state.reservation_counter += 1;
        let id = ReservationId(
            (u128::from(state.reservation_prefix) << 64) | u128::from(state.reservation_counter),
        );
        let reservation = Reservation {
            id,
            account,
            sink,
            amount_cu,
            expires_at_ms: self.clock.now_ms() + life.as_millis() as i64,
        };
        state.reservations.insert(id, (reservation, lease_id));
        Some(reservation)
    }

    /// Gives back at once the leases taken at the edge of a balance that nothing uses now.
    fn return_idle_edge_leases(&self) {
        let idle: Vec<i64> = {
            let mut state = self.state.lock();
            let idle: Vec<i64> = state
                .leases
                .at_the_edge()
                .filter(|id| {
                    state
                        .leases
                        .get(*id)
                        .is_some_and(|lease| lease.reserved_cu == 0 && lease.pending_cu == 0)
                })
                .collect();
            for id in &idle {
                state.leases.remove(*id);
            }
            idle
        };
        for id in idle {
            if let Err(error) = self.store.release_lease(id) {
                tracing::warn!(%error, lease = id, "a lease could not be given back; it will expire");
            }
        }
    }

    /// Renews the leases in use that are past half their life, gives back the idle ones and
    /// drops the ones past their deadline; then gives back expired leases of any node.
    fn maintain(&self, last_reclaim: &mut Instant) {
        let now = Instant::now();
        let ttl = self.store.lease_ttl();
        let (renew, release): (Vec<i64>, Vec<i64>) = {
            let mut state = self.state.lock();
            let options = &self.options;
            let mut renew = Vec::new();
            let mut release = Vec::new();
            state.leases.retain(|id, lease| {
                let idle = lease.reserved_cu == 0
                    && lease.pending_cu == 0
                    && now.duration_since(lease.last_used) >= options.idle_return;
                if lease.deadline <= now {
                    // Past its deadline: nothing more is decided on it, and its reservations
                    // (cut by their own deadlines) settle against what is available.
                    return lease.reserved_cu > 0 || lease.pending_cu > 0;
                }
                if idle {
                    release.push(id);
                    return false;
                }
                if lease.deadline.saturating_duration_since(now) < ttl / 2 {
                    renew.push(id);
                }
                true
            });
            (renew, release)
        };
        for id in release {
            if let Err(error) = self.store.release_lease(id) {
                tracing::warn!(%error, lease = id, "a lease could not be given back; it will expire");
            }
        }
        for id in renew {
            let asked_at = Instant::now();
            match self.store.renew_lease(id) {
                Ok(true) => {
                    let mut state = self.state.lock();
                    if let Some(lease) = state.leases.get_mut(id) {
                        lease.deadline = asked_at + ttl.saturating_sub(self.options.lease_margin);
                    }
                }
                Ok(false) => {
                    tracing::warn!(lease = id, "a lease expired before it was renewed");
                    let mut state = self.state.lock();
                    if let Some(lease) = state.leases.get_mut(id) {
                        lease.deadline = asked_at;
                        lease.free_cu = 0;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, lease = id, "a lease could not be renewed");
                }
            }
        }
        if last_reclaim.elapsed() >= ttl {
            *last_reclaim = Instant::now();
            if let Err(error) = self.store.reclaim_expired_leases() {
                tracing::warn!(%error, "expired leases could not be reclaimed");
            }
        }
    }
}

/// The node's writer: commits queued settles many to a transaction, and looks after the leases
/// between commits. At shutdown it commits what is queued and gives every lease back.
fn run_writer(shared: &Shared) {
    let mut last_maintained = Instant::now();
    let mut last_reclaim = Instant::now();
    loop {
        let paused = shared.state.lock().paused_until.take();
        if let Some(until) = paused {
            std::thread::sleep(until.saturating_duration_since(Instant::now()));
        }
        let batch: Vec<(u64, LeaseSpend)> = {
            let mut state = shared.state.lock();
            if state.queue.is_empty() && !state.shutdown {
                let left = shared
                    .options
                    .tick
                    .saturating_sub(last_maintained.elapsed());
                shared
                    .work
                    .wait_for(&mut state, left.max(Duration::from_millis(1)));
            }
            if state.abandon {
                return;
            }
            if state.queue.is_empty() && state.shutdown {
                break;
            }
            let take = state.queue.len().min(shared.options.commit_batch_max);
            state.queue.drain(..take).collect()
        };
        if !batch.is_empty() {
            commit(shared, batch);
        }
        shared.return_idle_edge_leases();
        if last_maintained.elapsed() >= shared.options.tick {
            last_maintained = Instant::now();
            shared.maintain(&mut last_reclaim);
        }
    }
    // Shutdown: every lease goes back.
    let leases = shared.state.lock().leases.take_all();
    for id in leases {
        if let Err(error) = shared.store.release_lease(id) {
            tracing::warn!(%error, lease = id, "a lease could not be given back; it will expire");
        }
    }
}

fn commit(shared: &Shared, batch: Vec<(u64, LeaseSpend)>) {
    let seq_max = batch.last().map_or(0, |(seq, _)| *seq);
    let spends: Vec<LeaseSpend> = batch.into_iter().map(|(_, spend)| spend).collect();
    let started = Instant::now();
    let result = shared.store.settle_leased(&spends);
    {
        let mut stats = shared.stats.lock();
        stats.commits += 1;
        stats.mutations += spends.len() as u64;
        stats.commit_us_total += started.elapsed().as_micros() as u64;
    }
    match result {
        Ok(outcomes) => {
            {
                let mut state = shared.state.lock();
                for spend in &spends {
                    if let Some(lease) = state.leases.get_mut(spend.lease) {
                        lease.pending_cu -= spend.transfer.amount_cu;
                    }
                }
            }
            for (spend, outcome) in spends.iter().zip(outcomes) {
                if let SpendOutcome::Unleased { shortfall_cu } = outcome {
                    // Only a node past its lease's deadline gets here (a bug, or a clock gone
                    // wrong): what was acknowledged as charged may then exceed what was.
                    tracing::error!(
                        lease = spend.lease,
                        shortfall_cu,
                        "a spend was committed after its lease had expired"
                    );
                }
            }
            shared.tracker.advance(seq_max);
        }
        Err(error) if committed_after_all(shared, &spends) => {
            tracing::warn!(%error, "a settle's acknowledgement was lost, but it was committed");
            let mut state = shared.state.lock();
            for spend in &spends {
                if let Some(lease) = state.leases.get_mut(spend.lease) {
                    lease.pending_cu -= spend.transfer.amount_cu;
                }
            }
            drop(state);
            shared.tracker.advance(seq_max);
        }
        Err(error) => {
            // Nothing of the batch is known to be committed: every later decision would rest on
            // leases whose state is unknown, so the node closes, forgets its leases (they expire
            // in the database) and reopens once the database takes writes again.
            tracing::error!(%error, "a settle could not be committed; the node refuses work until the database is back");
            let reason = format!("a commit to the database failed ({error})");
            let seq_last = {
                let mut state = shared.state.lock();
                state.failure = Some(reason.clone());
                state.queue.clear();
                state.leases.clear();
                state.reservations.clear();
                state.seq_last
            };
            shared.tracker.fail(reason);
            loop {
                std::thread::sleep(crate::limits::RECOVERY_INTERVAL);
                if shared.state.lock().shutdown {
                    return;
                }
                if shared.store.reclaim_expired_leases().is_ok() {
                    break;
                }
            }
            shared.tracker.reopen(seq_last);
            shared.state.lock().failure = None;
            tracing::warn!("the database takes writes again; the node reopened");
        }
    }
}

/// After a failed commit: whether it happened after all (its acknowledgement lost with the
/// connection), asked of the database for a few seconds; false if it did not, or if the database
/// cannot say in that time.
fn committed_after_all(shared: &Shared, spends: &[LeaseSpend]) -> bool {
    let Some(first) = spends.first() else {
        return false;
    };
    let until = Instant::now() + COMMIT_CHECK_TIME;
    loop {
        match shared.store.settled(first.transfer.id) {
            Ok(committed) => return committed,
            Err(_) if Instant::now() < until => std::thread::sleep(Duration::from_millis(200)),
            Err(error) => {
                tracing::error!(%error, "whether a settle was committed is unknown; it is counted as lost");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(account: u64, at_the_edge: bool) -> LeaseState {
        let now = Instant::now();
        LeaseState {
            account: AccountId(account),
            free_cu: 10,
            reserved_cu: 0,
            pending_cu: 0,
            at_the_edge,
            deadline: now + Duration::from_secs(30),
            last_used: now,
        }
    }

    fn ids_of(leases: &Leases, account: u64) -> Vec<i64> {
        let mut ids: Vec<i64> = leases.of(AccountId(account)).map(|(id, _)| id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn the_indexes_follow_every_way_a_lease_goes() {
        let mut leases = Leases::default();
        leases.insert(1, lease(7, false));
        leases.insert(2, lease(7, true));
        leases.insert(3, lease(8, true));
        leases.insert(4, lease(8, false));
        assert_eq!(ids_of(&leases, 7), [1, 2]);
        assert_eq!(ids_of(&leases, 8), [3, 4]);
        let mut edge: Vec<i64> = leases.at_the_edge().collect();
        edge.sort_unstable();
        assert_eq!(edge, [2, 3]);

        assert!(leases.remove(2).is_some());
        assert!(leases.remove(2).is_none());
        assert_eq!(ids_of(&leases, 7), [1]);
        assert_eq!(leases.at_the_edge().collect::<Vec<_>>(), [3]);

        leases.retain(|id, lease| {
            lease.free_cu = 0;
            id != 3
        });
        assert_eq!(ids_of(&leases, 8), [4]);
        assert_eq!(leases.at_the_edge().count(), 0);
        assert!(leases.get(4).is_some_and(|lease| lease.free_cu == 0));

        assert!(leases.remove(1).is_some());
        assert!(!leases.by_account.contains_key(&AccountId(7)));
        let mut all = leases.take_all();
        all.sort_unstable();
        assert_eq!(all, [4]);
        assert_eq!(leases.len(), 0);
        assert_eq!(ids_of(&leases, 8), Vec::<i64>::new());
    }
}
