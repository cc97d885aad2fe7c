//! The ledger engine: balances in memory, decisions under one lock, every change written to the
//! store through one group-commit writer.
//!
//! Why this shape: a reservation must be decided in microseconds, so it never touches the disk;
//! a settle must be durable before it returns, so it waits for the writer; and many settles in
//! flight share one fsync, because the writer takes everything queued since its last commit.
//! The process that opens the ledger is the store's only writer, which is what makes the
//! in-memory balances authoritative (the store enforces that with a lock).
//!
//! The transfer log is the truth. A settle appends one transfer and changes no account row;
//! account rows are checkpoints, rewritten for the accounts changed since the last checkpoint
//! every [`LedgerOptions::checkpoint_interval`]. On open, the transfers after the last
//! checkpoint are replayed through [`apply`], the same function that made them live.
//!
//! Reservations live in memory only. A crash therefore voids every open reservation, which is
//! exactly the product's rule: a crash can release compute, never charge it twice.

use std::collections::HashMap;
use std::sync::Arc;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::account::{
    AccountId, AccountKind, AccountName, AccountRecord, Lot, SINK_NAME_PREFIX, Usage,
    normalize_account_name, usage_by_day, usage_in_period,
};
use crate::clock::Clock;
use crate::durable::{Durable, Tracker};
use crate::error::LedgerError;
use crate::limits::{AMOUNT_MAX_CU, LedgerOptions, RECOVERY_INTERVAL, SWEEP_INTERVAL_MS};
use crate::policy::StipendPolicy;
use crate::reservation::{Reservation, ReservationId, Settlement};
use crate::state::{Balance, apply, can_receive_gift};
use crate::store::{AccountUpdate, Batch, Store, StoreError};
use crate::transfer::{Transfer, TransferId, TransferKind};

/// The issuer's account name.
pub const ISSUER_NAME: &str = "issuer";

/// How a closed account's anonymous name begins: `closed:` and 32 random hex digits.
pub const CLOSED_NAME_PREFIX: &str = "closed:";

/// How many times a contender checks the state lock before parking (about 5 µs here).
const LOCK_SPINS: u32 = 256;

/// An account as a person or operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    /// Its id.
    pub id: AccountId,
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: AccountKind,
    /// Its balance, in cu.
    pub balance_cu: i64,
    /// What open reservations hold, in cu.
    pub reserved_cu: u64,
    /// What can be spent now: balance − reserved, never negative (0 for the issuer and sinks).
    pub available_cu: u64,
    /// When the next stipend arrives (ms since the epoch), for persons.
    pub next_grant_at_ms: Option<i64>,
    /// How many reservations are open.
    pub open_reservations: u32,
    /// The lots making up the balance, soonest expiry first.
    pub lots: Vec<Lot>,
    /// What it spent this period, per sink (one sink per model).
    pub usage: Vec<Usage>,
    /// What it spent in the period before this one, per sink: what the transparency report of
    /// the last complete period counts.
    pub last_period: Vec<Usage>,
    /// What it spent per sink and UTC day, over the last
    /// [`USAGE_DAYS_KEPT`](crate::limits::USAGE_DAYS_KEPT) days, oldest first.
    pub daily: Vec<Usage>,
}

/// The first UTC day whose usage a view shows, at `now_ms`.
pub fn first_day_kept(now_ms: i64) -> i64 {
    now_ms.div_euclid(crate::limits::DAY_MS) - (crate::limits::USAGE_DAYS_KEPT - 1)
}

/// A transfer that was posted, or found already posted with the same content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posted {
    /// The transfer.
    pub transfer: Transfer,
    /// True when this id had been posted before and nothing changed now.
    pub replayed: bool,
}

/// The ledger. Share it with `Arc<Ledger>`; dropping it flushes every queued change.
pub struct Ledger {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    /// Signals the writer that work is queued (or shutdown).
    work: Condvar,
    durable: Arc<Tracker>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    options: LedgerOptions,
    issuer: AccountId,
    stats: Mutex<WriterStats>,
}

/// What the group-commit writer has done since the ledger opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Commits to the store.
    pub commits: u64,
    /// Queued changes written by them.
    pub mutations: u64,
    /// How many of the commits were checkpoints.
    pub checkpoints: u64,
    /// Time spent inside the store's commit, in µs.
    pub commit_us_total: u64,
}

enum Mutation {
    Create(AccountRecord),
    Post(Transfer),
}

struct AccountState {
    name: Box<str>,
    balance: Balance,
    reserved_cu: u64,
    open_reservations: u32,
}

impl AccountState {
    fn from_record(record: AccountRecord) -> AccountState {
        AccountState {
            balance: Balance::from_record(&record),
            name: record.name.into_boxed_str(),
            reserved_cu: 0,
            open_reservations: 0,
        }
    }

    fn kind(&self) -> AccountKind {
        self.balance.kind
    }

    fn available_cu(&self) -> u64 {
        if !self.kind().holds_grants() {
            return 0;
        }
        (self.balance.balance_cu as u64).saturating_sub(self.reserved_cu)
    }
}

struct State {
    // FxHash: the keys are ids we assign, not attacker-chosen strings, so a fast hash is safe
    // here, and SipHash was a good part of the time the lock is held.
    accounts: FxHashMap<AccountId, AccountState>,
    /// Accounts changed since the last checkpoint.
    dirty: FxHashSet<AccountId>,
    reservations: FxHashMap<ReservationId, Reservation>,
    queue: Vec<(u64, Mutation)>,
    seq_last: u64,
    /// Transfers posted with caller-chosen ids that are not yet durable, for replay checks.
    pending_transfers: HashMap<TransferId, (Transfer, u64)>,
    /// Accounts created and not yet durable, for name lookups.
    pending_names: HashMap<Box<str>, (AccountId, u64)>,
    /// The same accounts by the skeletons of their names: name and sequence number.
    pending_skeletons: HashMap<Box<str>, (Box<str>, u64)>,
    account_id_next: u64,
    reservation_id_next: u64,
    transfer_prefix: u64,
    transfer_counter: u64,
    sweep_next_at_ms: i64,
    shutdown: bool,
    failure: Option<String>,
    /// Counts resets: an account read from the store before one is read again after it.
    generation: u64,
}

impl State {
    fn push(&mut self, mutation: Mutation) -> u64 {
        self.seq_last += 1;
        self.queue.push((self.seq_last, mutation));
        self.seq_last
    }

    fn next_transfer_id(&mut self) -> TransferId {
        self.transfer_counter += 1;
        TransferId((u128::from(self.transfer_prefix) << 64) | u128::from(self.transfer_counter))
    }

    fn account(&self, id: AccountId) -> Result<&AccountState, LedgerError> {
        self.accounts
            .get(&id)
            .ok_or_else(|| LedgerError::UnknownAccount {
                name: id.to_string(),
            })
    }

    fn account_mut(&mut self, id: AccountId) -> Result<&mut AccountState, LedgerError> {
        self.accounts
            .get_mut(&id)
            .ok_or_else(|| LedgerError::UnknownAccount {
                name: id.to_string(),
            })
    }

    /// Applies a transfer to its two loaded accounts and queues it for the store. Everything
    /// that could make it fail was checked by the caller, so a failure here is a bug.
    /// Refuses a transfer of `amount_cu` that would take either side's balance past what an
    /// `i64` holds (an operator's grants can add up to that; `apply` would then fail, which is
    /// a broken invariant, so it is checked before).
    fn check_room(
        &self,
        debit: AccountId,
        credit: AccountId,
        amount_cu: u64,
    ) -> Result<(), LedgerError> {
        let amount =
            i64::try_from(amount_cu).map_err(|_| LedgerError::BalanceLimit { account: credit })?;
        if self
            .account(debit)?
            .balance
            .balance_cu
            .checked_sub(amount)
            .is_none()
        {
            return Err(LedgerError::BalanceLimit { account: debit });
        }
        if self
            .account(credit)?
            .balance
            .balance_cu
            .checked_add(amount)
            .is_none()
        {
            return Err(LedgerError::BalanceLimit { account: credit });
        }
        Ok(())
    }

    fn post(&mut self, transfer: Transfer) -> Transfer {
        self.apply_loaded(&transfer);
        self.push(Mutation::Post(transfer));
        transfer
    }

    /// Applies a transfer to in-memory state without queueing it.
    fn apply_loaded(&mut self, transfer: &Transfer) {
        let applied = self.try_apply_loaded(transfer);
        assert!(applied.is_ok(), "ledger invariant broken: {applied:?}");
    }

    /// Applies a transfer to its two loaded accounts; says why not if it cannot.
    fn try_apply_loaded(&mut self, transfer: &Transfer) -> Result<(), String> {
        if transfer.debit == transfer.credit {
            return Err(format!(
                "transfer {} moves compute to its source",
                transfer.id
            ));
        }
        let [Some(debit), Some(credit)] = self
            .accounts
            .get_disjoint_mut([&transfer.debit, &transfer.credit])
        else {
            return Err(format!("transfer {} names an unknown account", transfer.id));
        };
        apply(&mut debit.balance, &mut credit.balance, transfer).map_err(|e| e.to_string())?;
        for (id, account) in [(transfer.debit, &*debit), (transfer.credit, &*credit)] {
            account.balance.check(id)?;
            // Holds never exceed the balance: available is never negative.
            if account.kind().holds_grants()
                && i128::from(account.reserved_cu) > i128::from(account.balance.balance_cu)
            {
                return Err(format!(
                    "account {id}: reserved {} exceeds balance {}",
                    account.reserved_cu, account.balance.balance_cu
                ));
            }
        }
        self.dirty.insert(transfer.debit);
        self.dirty.insert(transfer.credit);
        Ok(())
    }
}

fn transfer(
    kind: TransferKind,
    id: TransferId,
    debit: AccountId,
    credit: AccountId,
    amount_cu: u64,
    now_ms: i64,
) -> Transfer {
    Transfer {
        id,
        kind,
        debit,
        credit,
        amount_cu,
        created_at_ms: now_ms,
        lot_expires_at_ms: None,
        period: None,
    }
}

impl Shared {
    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Locks the state, spinning briefly first. A decision holds the lock for well under a
    /// microsecond, so a contender that parks on a futex pays tens of microseconds of wake-up for
    /// a wait that would have lasted one; spinning (reading only, then one attempt) for a few
    /// microseconds while the holder runs on another core avoids that, and past that bound it
    /// parks as usual (the writer's checkpoint snapshot can hold the lock for milliseconds).
    fn lock_state(&self) -> MutexGuard<'_, State> {
        for _ in 0..LOCK_SPINS {
            if !self.state.is_locked()
                && let Some(guard) = self.state.try_lock()
            {
                return guard;
            }
            std::hint::spin_loop();
        }
        self.state.lock()
    }

    /// Locks the state with every account in `ids` loaded from the store. Store reads happen
    /// outside the lock, so a cold account never stalls the hot ones.
    fn lock_with(&self, ids: &[AccountId]) -> Result<MutexGuard<'_, State>, LedgerError> {
        self.lock_loaded(ids, false)
    }

    /// [`Shared::lock_with`], and for the replay of the log after a reset (`replaying`), which
    /// runs while the ledger is still closed to everyone else.
    fn lock_loaded(
        &self,
        ids: &[AccountId],
        replaying: bool,
    ) -> Result<MutexGuard<'_, State>, LedgerError> {
        let closed = |state: &State| match &state.failure {
            Some(failure) if !replaying => Err(LedgerError::Unavailable {
                reason: failure.clone(),
            }),
            _ => Ok(()),
        };
        loop {
            let state = self.lock_state();
            closed(&state)?;
            let generation = state.generation;
            let missing: Vec<AccountId> = ids
                .iter()
                .copied()
                .filter(|id| !state.accounts.contains_key(id))
                .collect();
            if missing.is_empty() {
                return Ok(state);
            }
            drop(state);
            let mut loaded = Vec::with_capacity(missing.len());
            for id in missing {
                let record =
                    self.store
                        .account(id)?
                        .ok_or_else(|| LedgerError::UnknownAccount {
                            name: id.to_string(),
                        })?;
                loaded.push(record);
            }
            let mut state = self.lock_state();
            closed(&state)?;
            if state.generation != generation {
                // The ledger was reset while these were read: what was read may be older than
                // the log replayed since. Read again.
                continue;
            }
            for record in loaded {
                // Another thread may have loaded (and changed) it meanwhile: keep theirs.
                state
                    .accounts
                    .entry(record.id)
                    .or_insert_with(|| AccountState::from_record(record));
            }
            return Ok(state);
        }
    }

    /// Applies due stipends and expiries to one loaded account.
    fn touch(&self, state: &mut State, id: AccountId, now_ms: i64) {
        let policy = &self.options.policy;
        let issuer = self.issuer;
        let Some(account) = state.accounts.get(&id) else {
            return;
        };
        if !account.kind().holds_grants() {
            return;
        }
        // The fast path, taken by nearly every call: this period's stipend is applied and no lot
        // has expired, which is known without walking the lots.
        let current = policy.period_index(now_ms);
        let stipend_due = account.kind() == AccountKind::Person
            && account.balance.stipend_period != Some(current);
        if !stipend_due && !account.balance.lots.any_expired(now_ms) {
            return;
        }
        if stipend_due {
            let lots = &account.balance.lots;
            let stipend_cu = lots.stipend_cu();
            let other_cu = lots.total_cu() - stipend_cu;
            if let Some(catch_up) = policy.catch_up(
                account.balance.stipend_period,
                current,
                stipend_cu,
                other_cu,
                account.reserved_cu,
            ) {
                // The stipend arrives (joining what is left of the last one), then whatever is
                // over the rollover cap goes back: two transfers, replayable one by one.
                let stipend_id = state.next_transfer_id();
                let mut stipend = transfer(
                    TransferKind::Stipend,
                    stipend_id,
                    issuer,
                    id,
                    catch_up.granted_cu,
                    now_ms,
                );
                stipend.lot_expires_at_ms = Some(catch_up.lot_expires_at_ms);
                stipend.period = Some(catch_up.period);
                state.post(stipend);
                if catch_up.expired_cu > 0 {
                    let rollover_id = state.next_transfer_id();
                    state.post(transfer(
                        TransferKind::Rollover,
                        rollover_id,
                        id,
                        issuer,
                        catch_up.expired_cu,
                        now_ms,
                    ));
                }
            }
        }
        let Some(account) = state.accounts.get(&id) else {
            return;
        };
        let expirable = account.balance.lots.expired_cu(now_ms);
        if expirable > 0 {
            // Compute held by open reservations is pinned: it cannot expire under them.
            let unpinned = (account.balance.balance_cu as u64).saturating_sub(account.reserved_cu);
            let expired = expirable.min(unpinned);
            if expired > 0 {
                let expiry_id = state.next_transfer_id();
                state.post(transfer(
                    TransferKind::Expiry,
                    expiry_id,
                    id,
                    issuer,
                    expired,
                    now_ms,
                ));
            }
        }
    }

    /// Voids every reservation whose deadline has passed, at most every [`SWEEP_INTERVAL_MS`].
    fn sweep(&self, state: &mut State, now_ms: i64, force: bool) -> usize {
        if !force && now_ms < state.sweep_next_at_ms {
            return 0;
        }
        state.sweep_next_at_ms = now_ms + SWEEP_INTERVAL_MS;
        let expired: Vec<ReservationId> = state
            .reservations
            .values()
            .filter(|reservation| reservation.expires_at_ms <= now_ms)
            .map(|reservation| reservation.id)
            .collect();
        for id in &expired {
            release(state, *id);
        }
        if !expired.is_empty() {
            tracing::info!(n_voided = expired.len(), "timed-out reservations voided");
        }
        expired.len()
    }

    fn check_pending_limit(&self, state: &State) -> Result<(), LedgerError> {
        if state.queue.len() >= self.options.pending_mutations_max {
            return Err(LedgerError::Overloaded {
                what: "changes waiting to be written",
            });
        }
        Ok(())
    }

    /// Looks for an earlier transfer with this id: queued, or in the store.
    fn find_posted(&self, state: &State, id: TransferId) -> Result<Option<Transfer>, LedgerError> {
        if let Some((transfer, _)) = state.pending_transfers.get(&id) {
            return Ok(Some(*transfer));
        }
        Ok(self.store.transfer(id)?)
    }

    /// Replays the transfers after the store's last checkpoint onto the accounts they name.
    fn replay_tail(&self) -> Result<(), LedgerError> {
        let started = Instant::now();
        let mut tail = Vec::new();
        self.store
            .transfers_after_checkpoint(&mut |transfer| tail.push(transfer))?;
        for transfer in &tail {
            let mut state = self.lock_loaded(&[transfer.debit, transfer.credit], true)?;
            state.try_apply_loaded(transfer).map_err(|reason| {
                LedgerError::Store(StoreError::Corrupt(format!(
                    "the log does not replay: {reason}"
                )))
            })?;
        }
        if !tail.is_empty() {
            tracing::info!(
                n_transfers = tail.len(),
                replay_ms = started.elapsed().as_millis() as u64,
                "replayed the log after the last checkpoint"
            );
            self.work.notify_one();
        }
        Ok(())
    }

    /// After a failed commit, once the store takes writes again: forgets everything in memory
    /// (what the failed commit held, and every reservation: a crash's rule, which releases
    /// compute and never charges it twice), reloads from the store as an open does, and reopens.
    /// The changes decided since the last durable commit are marked lost, so that whoever still
    /// waits on one is told it failed, however late they ask.
    fn reset(&self) -> Result<(), LedgerError> {
        let issuer = self.store.account(self.issuer)?.ok_or_else(|| {
            LedgerError::Store(StoreError::Corrupt(
                "the issuer's account is gone".to_string(),
            ))
        })?;
        let account_id_next = self.store.account_id_max()?.map_or(1, |id| id.0 + 1);
        let prefix = crate::transfer::random_u64();
        {
            let mut state = self.state.lock();
            self.durable.reopen(state.seq_last);
            // Closed until the log is replayed: a decision on a row read now, before the log's
            // tail is applied to it, could grant a stipend twice.
            state.failure = Some("the ledger is reloading from the store".to_string());
            state.generation += 1;
            state.accounts.clear();
            state
                .accounts
                .insert(issuer.id, AccountState::from_record(issuer));
            state.dirty.clear();
            state.reservations.clear();
            state.queue.clear();
            state.pending_transfers.clear();
            state.pending_names.clear();
            state.pending_skeletons.clear();
            state.account_id_next = account_id_next;
            state.transfer_prefix = prefix;
            state.transfer_counter = 0;
        }
        self.replay_tail()?;
        self.state.lock().failure = None;
        Ok(())
    }

    fn durable<T>(self: &Arc<Self>, value: T, seq: u64) -> Durable<T> {
        Durable::new(value, seq, Arc::clone(&self.durable))
    }
}

/// Removes an open reservation and gives its hold back. Returns the amount released.
fn release(state: &mut State, id: ReservationId) -> Option<Reservation> {
    let reservation = state.reservations.remove(&id)?;
    if let Some(account) = state.accounts.get_mut(&reservation.account) {
        assert!(account.reserved_cu >= reservation.amount_cu);
        account.reserved_cu -= reservation.amount_cu;
        account.open_reservations -= 1;
    }
    Some(reservation)
}

pub(crate) fn check_amount(amount_cu: u64) -> Result<(), LedgerError> {
    if amount_cu == 0 {
        return Err(LedgerError::InvalidAmount {
            reason: "the amount must be greater than zero".to_string(),
        });
    }
    if amount_cu > AMOUNT_MAX_CU {
        return Err(LedgerError::InvalidAmount {
            reason: format!("the amount must be at most {AMOUNT_MAX_CU} cu"),
        });
    }
    Ok(())
}

/// A reservation's timeout: from 1 ms to the engine's maximum.
pub(crate) fn check_timeout(timeout: Duration, max: Duration) -> Result<(), LedgerError> {
    if timeout.is_zero() || timeout > max {
        return Err(LedgerError::InvalidTimeout {
            reason: format!("must be between 1ms and {}s", max.as_secs()),
        });
    }
    Ok(())
}

/// The issuer's name and the sinks' prefix belong to those kinds alone, so that no person can
/// be mistaken for either, nor take a name a model's sink will need.
pub fn check_name_reserved(name: &str, kind: AccountKind) -> Result<(), LedgerError> {
    let reserved = if name == ISSUER_NAME {
        kind != AccountKind::Issuer
    } else if name.starts_with(SINK_NAME_PREFIX) {
        kind != AccountKind::Sink
    } else {
        // Closed accounts' anonymous names: nobody is created under one.
        name.starts_with(CLOSED_NAME_PREFIX)
    };
    if reserved {
        return Err(LedgerError::InvalidName {
            reason: format!(
                "{name:?} is reserved: \"{ISSUER_NAME}\" and names that start with \"{SINK_NAME_PREFIX}\" \
                 or \"{CLOSED_NAME_PREFIX}\" are the ledger's own"
            ),
        });
    }
    Ok(())
}

impl Ledger {
    /// Opens the ledger on a store: finds or creates the issuer and starts the writer.
    /// Start-up reads nothing else: accounts load when first touched.
    pub fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        options: LedgerOptions,
    ) -> Result<Ledger, LedgerError> {
        let account_id_next = store.account_id_max()?.map_or(1, |id| id.0 + 1);
        let existing_issuer = store.account_by_name(ISSUER_NAME)?;
        let issuer = existing_issuer
            .as_ref()
            .map_or(AccountId(account_id_next), |record| record.id);
        if let Some(record) = &existing_issuer
            && record.kind != AccountKind::Issuer
        {
            return Err(LedgerError::Store(crate::store::StoreError::Corrupt(
                format!(
                    "account {ISSUER_NAME:?} exists but is a {} account",
                    record.kind
                ),
            )));
        }
        let prefix = crate::transfer::random_u64();
        let state = State {
            accounts: FxHashMap::default(),
            dirty: FxHashSet::default(),
            reservations: FxHashMap::default(),
            queue: Vec::new(),
            seq_last: 0,
            pending_transfers: HashMap::new(),
            pending_names: HashMap::new(),
            pending_skeletons: HashMap::new(),
            account_id_next,
            reservation_id_next: 1,
            transfer_prefix: prefix,
            transfer_counter: 0,
            sweep_next_at_ms: 0,
            shutdown: false,
            failure: None,
            generation: 0,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            work: Condvar::new(),
            durable: Arc::new(Tracker::default()),
            store,
            clock,
            options,
            issuer,
            stats: Mutex::new(WriterStats::default()),
        });
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("ledger-writer".to_string())
            .spawn(move || run_writer(&writer_shared))
            .map_err(|error| LedgerError::Unavailable {
                reason: format!("cannot start the ledger writer: {error}"),
            })?;
        let ledger = Ledger {
            shared,
            writer: Some(writer),
        };
        // The issuer takes part in every stipend, so it is loaded once and stays loaded.
        match existing_issuer {
            Some(record) => {
                let mut state = ledger.shared.state.lock();
                state
                    .accounts
                    .insert(record.id, AccountState::from_record(record));
            }
            None => {
                ledger
                    .create_with_kind(ISSUER_NAME, AccountKind::Issuer)?
                    .wait()?;
            }
        }
        ledger.recover()?;
        Ok(ledger)
    }

    /// Replays the transfers after the last checkpoint onto the accounts they name, through the
    /// same [`apply`] that made them live. The accounts they touch are then loaded and dirty, so
    /// the next checkpoint (within one interval) brings their rows up to date.
    fn recover(&self) -> Result<(), LedgerError> {
        self.shared.replay_tail()
    }

    /// The stipend policy.
    pub fn policy(&self) -> &StipendPolicy {
        &self.shared.options.policy
    }

    /// The store, for the parts of it that are not the ledger's (API keys).
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.shared.store)
    }

    /// The issuer's account.
    pub fn issuer(&self) -> AccountId {
        self.shared.issuer
    }

    /// Now, by the ledger's clock.
    pub fn now_ms(&self) -> i64 {
        self.shared.now_ms()
    }

    /// Creates a person, pool, agent or sink account.
    pub fn create_account(
        &self,
        name: &str,
        kind: AccountKind,
    ) -> Result<Durable<AccountId>, LedgerError> {
        if kind == AccountKind::Issuer {
            return Err(LedgerError::WrongKind {
                account: self.shared.issuer,
                kind,
                operation: "be created (there is exactly one issuer)",
            });
        }
        self.create_with_kind(name, kind)
    }

    fn create_with_kind(
        &self,
        name: &str,
        kind: AccountKind,
    ) -> Result<Durable<AccountId>, LedgerError> {
        let AccountName { name, skeleton } =
            normalize_account_name(name).map_err(|reason| LedgerError::InvalidName { reason })?;
        check_name_reserved(&name, kind)?;
        let shared = &self.shared;
        let mut state = shared.lock_with(&[])?;
        shared.check_pending_limit(&state)?;
        if state.pending_names.contains_key(name.as_str())
            || shared.store.account_by_name(&name)?.is_some()
        {
            return Err(LedgerError::AccountExists { name });
        }
        // Sinks are named by the operator's configuration, one per model, and a person can
        // never take a sink's prefix; so only the names people are known by are held apart.
        if kind != AccountKind::Sink {
            let pending = state
                .pending_skeletons
                .get(skeleton.as_str())
                .map(|(existing, _)| existing.to_string());
            let existing = match pending {
                Some(existing) => Some(existing),
                None => shared
                    .store
                    .account_by_skeleton(&skeleton)?
                    .map(|record| record.name),
            };
            if let Some(existing) = existing {
                return Err(LedgerError::NameConfusable { name, existing });
            }
        }
        let now_ms = shared.now_ms();
        let id = AccountId(state.account_id_next);
        state.account_id_next += 1;
        let record = AccountRecord {
            id,
            name: name.clone(),
            kind,
            balance_cu: 0,
            lots: Vec::new(),
            stipend_period: None,
            usage: Vec::new(),
            created_at_ms: now_ms,
        };
        state
            .accounts
            .insert(id, AccountState::from_record(record.clone()));
        let seq = state.push(Mutation::Create(record));
        state
            .pending_skeletons
            .insert(skeleton.into(), (name.as_str().into(), seq));
        state.pending_names.insert(name.into(), (id, seq));
        // A new person's first stipend arrives at once.
        shared.touch(&mut state, id, now_ms);
        let seq = state.seq_last;
        drop(state);
        shared.work.notify_one();
        tracing::info!(account = %id, kind = %kind, "account created");
        Ok(shared.durable(id, seq))
    }

    /// Finds an account's id by name. The name is looked up in its NFKC form, as names are
    /// stored ([`normalize_account_name`]), and as written if that finds nothing: a name stored
    /// before names were normalized keeps working.
    pub fn account_id(&self, name: &str) -> Result<AccountId, LedgerError> {
        use unicode_normalization::UnicodeNormalization;

        let normalized: String = name.nfkc().collect();
        let mut candidates = vec![normalized.as_str()];
        if normalized != name {
            candidates.push(name);
        }
        for candidate in candidates {
            {
                let state = self.shared.lock_with(&[])?;
                if let Some((id, _)) = state.pending_names.get(candidate) {
                    return Ok(*id);
                }
            }
            if let Some(record) = self.shared.store.account_by_name(candidate)? {
                return Ok(record.id);
            }
        }
        Err(LedgerError::UnknownAccount {
            name: name.to_string(),
        })
    }

    /// Finds or creates the sink account with this name.
    pub fn sink(&self, name: &str) -> Result<AccountId, LedgerError> {
        match self.account_id(name) {
            Ok(id) => {
                let state = self.shared.lock_with(&[id])?;
                let kind = state.account(id)?.kind();
                if kind != AccountKind::Sink {
                    return Err(LedgerError::WrongKind {
                        account: id,
                        kind,
                        operation: "be used as a sink",
                    });
                }
                Ok(id)
            }
            Err(LedgerError::UnknownAccount { .. }) => {
                match self.create_with_kind(name, AccountKind::Sink) {
                    Ok(created) => created.wait(),
                    // Another thread created it first.
                    Err(LedgerError::AccountExists { .. }) => self.account_id(name),
                    Err(error) => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// An account's balance, holds and next stipend, after applying what is due.
    pub fn view(&self, id: AccountId) -> Result<AccountView, LedgerError> {
        let shared = &self.shared;
        let mut state = shared.lock_with(&[id])?;
        let now_ms = shared.now_ms();
        shared.sweep(&mut state, now_ms, false);
        shared.touch(&mut state, id, now_ms);
        let account = state.account(id)?;
        let view = AccountView {
            id,
            name: account.name.to_string(),
            kind: account.kind(),
            balance_cu: account.balance.balance_cu,
            reserved_cu: account.reserved_cu,
            available_cu: account.available_cu(),
            next_grant_at_ms: (account.kind() == AccountKind::Person)
                .then(|| shared.options.policy.next_grant_at_ms(now_ms)),
            open_reservations: account.open_reservations,
            lots: account.balance.lots.to_vec(),
            usage: usage_in_period(
                &account.balance.usage,
                shared.options.policy.period_index(now_ms),
            ),
            last_period: usage_in_period(
                &account.balance.usage,
                shared.options.policy.period_index(now_ms) - 1,
            ),
            daily: usage_by_day(&account.balance.usage, first_day_kept(now_ms)),
        };
        let queued = !state.queue.is_empty();
        drop(state);
        if queued {
            shared.work.notify_one();
        }
        Ok(view)
    }

    /// Up to `limit` accounts after `after`, in id order, as [`Ledger::view`] shows them.
    pub fn views(
        &self,
        after: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountView>, LedgerError> {
        self.flush()?;
        let records = self.shared.store.accounts(after, limit)?;
        records.iter().map(|record| self.view(record.id)).collect()
    }

    /// Holds `amount_cu` of `account`'s balance for a request until it is settled, voided, or
    /// `timeout` passes. Decided in memory; nothing waits for the disk.
    pub fn reserve(
        &self,
        account: AccountId,
        sink: AccountId,
        amount_cu: u64,
        timeout: Duration,
    ) -> Result<Reservation, LedgerError> {
        check_amount(amount_cu)?;
        let shared = &self.shared;
        check_timeout(timeout, shared.options.reservation_timeout_max)?;
        let mut state = shared.lock_with(&[account, sink])?;
        let now_ms = shared.now_ms();
        shared.sweep(&mut state, now_ms, false);
        let kind = state.account(account)?.kind();
        if !kind.holds_grants() {
            return Err(LedgerError::WrongKind {
                account,
                kind,
                operation: "reserve compute",
            });
        }
        let sink_kind = state.account(sink)?.kind();
        if sink_kind != AccountKind::Sink {
            return Err(LedgerError::WrongKind {
                account: sink,
                kind: sink_kind,
                operation: "receive spent compute",
            });
        }
        if state.reservations.len() >= shared.options.reservations_open_max {
            return Err(LedgerError::Overloaded {
                what: "open reservations",
            });
        }
        let queued_before = state.queue.len();
        shared.touch(&mut state, account, now_ms);
        let queued = state.queue.len() > queued_before;
        let record = state.account_mut(account)?;
        let available_cu = record.available_cu();
        if available_cu < amount_cu {
            let next_grant_at_ms = (kind == AccountKind::Person)
                .then(|| shared.options.policy.next_grant_at_ms(now_ms));
            drop(state);
            if queued {
                shared.work.notify_one();
            }
            tracing::debug!(account = %account, needed_cu = amount_cu, available_cu, "reservation refused");
            return Err(LedgerError::InsufficientBalance {
                account,
                needed_cu: amount_cu,
                available_cu,
                next_grant_at_ms,
            });
        }
        record.reserved_cu += amount_cu;
        record.open_reservations += 1;
        // Only the hold changed (lots and balance did not): the O(1) part of the invariants.
        assert!(
            record.reserved_cu <= record.balance.balance_cu as u64,
            "account {account}: reserved {} exceeds balance {}",
            record.reserved_cu,
            record.balance.balance_cu
        );
        let id = ReservationId(
            (u128::from(state.transfer_prefix) << 64) | u128::from(state.reservation_id_next),
        );
        state.reservation_id_next += 1;
        let reservation = Reservation {
            id,
            account,
            sink,
            amount_cu,
            expires_at_ms: now_ms.saturating_add(timeout.as_millis() as i64),
        };
        state.reservations.insert(id, reservation);
        drop(state);
        if queued {
            shared.work.notify_one();
        }
        Ok(reservation)
    }

    /// Charges exactly `actual_cu` for a reservation, moving it to the reservation's sink, and
    /// releases the rest. If `actual_cu` exceeds the reservation, the excess is charged as far as
    /// the available balance covers it and the remainder is reported as a shortfall: the balance
    /// never goes below zero. Durable once [`Durable::wait`] returns.
    pub fn settle(
        &self,
        id: ReservationId,
        actual_cu: u64,
    ) -> Result<Durable<Settlement>, LedgerError> {
        if actual_cu > AMOUNT_MAX_CU {
            return Err(LedgerError::InvalidAmount {
                reason: format!("the amount must be at most {AMOUNT_MAX_CU} cu"),
            });
        }
        let shared = &self.shared;
        let mut state = shared.lock_with(&[])?;
        shared.check_pending_limit(&state)?;
        let now_ms = shared.now_ms();
        let open = state.reservations.get(&id).copied();
        let Some(reservation) = open.filter(|reservation| reservation.expires_at_ms > now_ms)
        else {
            if open.is_some() {
                release(&mut state, id);
            }
            return Err(LedgerError::UnknownReservation { id });
        };
        let account_id = reservation.account;
        // Apply what is due while the hold still pins its compute against expiry, then release.
        shared.touch(&mut state, account_id, now_ms);
        release(&mut state, id);
        let charged_cu = actual_cu.min(state.account(account_id)?.available_cu());
        assert!(
            charged_cu >= actual_cu.min(reservation.amount_cu),
            "a reservation's own hold must always cover its charge"
        );
        let mut spend = None;
        if charged_cu > 0 {
            let spend_id = state.next_transfer_id();
            spend = Some(spend_id);
            let mut posted = transfer(
                TransferKind::Spend,
                spend_id,
                account_id,
                reservation.sink,
                charged_cu,
                now_ms,
            );
            // The period the spend counts in, for the account's usage this period.
            posted.period = Some(shared.options.policy.period_index(now_ms));
            state.post(posted);
        }
        let settlement = Settlement {
            reservation: id,
            charged_cu,
            shortfall_cu: actual_cu - charged_cu,
            released_cu: reservation.amount_cu.saturating_sub(charged_cu),
            transfer: spend,
        };
        if settlement.shortfall_cu > 0 {
            tracing::warn!(
                account = %account_id,
                reservation = %id,
                shortfall_cu = settlement.shortfall_cu,
                "settle exceeded what the account could cover"
            );
        }
        let seq = state.seq_last;
        drop(state);
        shared.work.notify_one();
        Ok(shared.durable(settlement, seq))
    }

    /// Releases a reservation without charging anything. Returns what it held.
    pub fn void(&self, id: ReservationId) -> Result<u64, LedgerError> {
        let mut state = self.shared.lock_with(&[])?;
        release(&mut state, id)
            .map(|reservation| reservation.amount_cu)
            .ok_or(LedgerError::UnknownReservation { id })
    }

    /// Voids every timed-out reservation now. Returns how many.
    pub fn sweep(&self) -> Result<usize, LedgerError> {
        let mut state = self.shared.lock_with(&[])?;
        let now_ms = self.shared.now_ms();
        Ok(self.shared.sweep(&mut state, now_ms, true))
    }

    /// An operator's grant of `amount_cu` from the issuer to a person, pool or agent, expiring at
    /// `expires_at_ms` (or never). Idempotent by `id`.
    pub fn grant(
        &self,
        id: TransferId,
        to: AccountId,
        amount_cu: u64,
        expires_at_ms: Option<i64>,
    ) -> Result<Durable<Posted>, LedgerError> {
        check_amount(amount_cu)?;
        let shared = &self.shared;
        let issuer = shared.issuer;
        let mut state = shared.lock_with(&[to, issuer])?;
        shared.check_pending_limit(&state)?;
        let now_ms = shared.now_ms();
        let mut candidate = transfer(TransferKind::Grant, id, issuer, to, amount_cu, now_ms);
        candidate.lot_expires_at_ms = expires_at_ms;
        if let Some(posted) = self.replay(&state, &candidate)? {
            return Ok(posted);
        }
        let kind = state.account(to)?.kind();
        if !kind.holds_grants() {
            return Err(LedgerError::WrongKind {
                account: to,
                kind,
                operation: "receive a grant",
            });
        }
        if expires_at_ms.is_some_and(|expires| expires <= now_ms) {
            return Err(LedgerError::InvalidAmount {
                reason: "the grant's expiry is in the past".to_string(),
            });
        }
        shared.touch(&mut state, to, now_ms);
        let lots = &state.account(to)?.balance.lots;
        if !lots.can_credit(expires_at_ms, crate::account::LotSource::Grant) {
            return Err(LedgerError::TooManyLots { account: to });
        }
        state.check_room(candidate.debit, candidate.credit, amount_cu)?;
        let posted = state.post(candidate);
        let seq = state.seq_last;
        state.pending_transfers.insert(id, (posted, seq));
        drop(state);
        shared.work.notify_one();
        tracing::info!(account = %to, amount_cu, "operator grant");
        Ok(shared.durable(
            Posted {
                transfer: posted,
                replayed: false,
            },
            seq,
        ))
    }

    /// Gives `amount_cu` from one person (or pool) to another person or pool. The compute keeps
    /// its expiry. Idempotent by `id`.
    pub fn give(
        &self,
        id: TransferId,
        from: AccountId,
        to: AccountId,
        amount_cu: u64,
    ) -> Result<Durable<Posted>, LedgerError> {
        check_amount(amount_cu)?;
        if from == to {
            return Err(LedgerError::SameAccount);
        }
        let shared = &self.shared;
        let mut state = shared.lock_with(&[from, to])?;
        shared.check_pending_limit(&state)?;
        let now_ms = shared.now_ms();
        shared.sweep(&mut state, now_ms, false);
        let to_kind = state.account(to)?.kind();
        let kind = if to_kind == AccountKind::Pool {
            TransferKind::PoolContribution
        } else {
            TransferKind::Gift
        };
        let candidate = transfer(kind, id, from, to, amount_cu, now_ms);
        if let Some(posted) = self.replay(&state, &candidate)? {
            return Ok(posted);
        }
        for (account, operation) in [(from, "give compute"), (to, "receive a gift")] {
            let kind = state.account(account)?.kind();
            if !kind.holds_grants() {
                return Err(LedgerError::WrongKind {
                    account,
                    kind,
                    operation,
                });
            }
        }
        shared.touch(&mut state, from, now_ms);
        shared.touch(&mut state, to, now_ms);
        let giver = state.account(from)?;
        let available_cu = giver.available_cu();
        if available_cu < amount_cu {
            let next_grant_at_ms = (giver.kind() == AccountKind::Person)
                .then(|| shared.options.policy.next_grant_at_ms(now_ms));
            return Err(LedgerError::InsufficientBalance {
                account: from,
                needed_cu: amount_cu,
                available_cu,
                next_grant_at_ms,
            });
        }
        // The gift keeps the expiry of the compute it is made from; check the recipient can hold
        // every slice before anything moves.
        if !can_receive_gift(&giver.balance, &state.account(to)?.balance, amount_cu) {
            return Err(LedgerError::TooManyLots { account: to });
        }
        state.check_room(candidate.debit, candidate.credit, amount_cu)?;
        let posted = state.post(candidate);
        let seq = state.seq_last;
        state.pending_transfers.insert(id, (posted, seq));
        drop(state);
        shared.work.notify_one();
        tracing::info!(from = %from, to = %to, amount_cu, "gift");
        Ok(shared.durable(
            Posted {
                transfer: posted,
                replayed: false,
            },
            seq,
        ))
    }

    /// Closes a person's or pool's account for good: its whole balance, whatever it is (this
    /// period's stipend included), goes back to the issuer in one `closure` transfer, and the
    /// account is closed by it: it receives no stipend, grant or gift and reserves nothing ever
    /// again. Refused while it holds compute for calls in flight. Closing a closed account does
    /// nothing (`None`).
    pub fn close(&self, account: AccountId) -> Result<Durable<Option<Posted>>, LedgerError> {
        let shared = &self.shared;
        let issuer = shared.issuer;
        let mut state = shared.lock_with(&[account, issuer])?;
        shared.check_pending_limit(&state)?;
        let now_ms = shared.now_ms();
        shared.sweep(&mut state, now_ms, false);
        let kind = state.account(account)?.kind();
        if kind == AccountKind::Closed {
            let seq = state.seq_last;
            return Ok(shared.durable(None, seq));
        }
        if !matches!(kind, AccountKind::Person | AccountKind::Pool) {
            return Err(LedgerError::WrongKind {
                account,
                kind,
                operation: "be closed",
            });
        }
        // What is due first (this period's stipend, expiries), so that the closure takes it.
        shared.touch(&mut state, account, now_ms);
        let closing = state.account(account)?;
        if closing.reserved_cu > 0 {
            return Err(LedgerError::AccountBusy {
                account,
                reserved_cu: closing.reserved_cu,
            });
        }
        let amount_cu = closing.balance.balance_cu.max(0) as u64;
        let id = state.next_transfer_id();
        let candidate = transfer(
            TransferKind::Closure,
            id,
            account,
            issuer,
            amount_cu,
            now_ms,
        );
        state.check_room(candidate.debit, candidate.credit, amount_cu)?;
        let posted = state.post(candidate);
        let seq = state.seq_last;
        drop(state);
        shared.work.notify_one();
        tracing::info!(account = %account, amount_cu, "account closed");
        Ok(shared.durable(
            Some(Posted {
                transfer: posted,
                replayed: false,
            }),
            seq,
        ))
    }

    /// Gives a closed account its anonymous name, in the store (the old name's bytes
    /// overwritten where the store can) and here.
    pub fn erase_names(&self, account: AccountId, anonymous_name: &str) -> Result<(), LedgerError> {
        {
            let state = self.shared.lock_with(&[account])?;
            let kind = state.account(account)?.kind();
            if kind != AccountKind::Closed {
                return Err(LedgerError::WrongKind {
                    account,
                    kind,
                    operation: "lose its name (close it first)",
                });
            }
        }
        self.shared.store.erase_names(account, anonymous_name)?;
        let mut state = self.shared.lock_with(&[account])?;
        state.account_mut(account)?.name = anonymous_name.into();
        Ok(())
    }

    /// If a transfer with the candidate's id exists: the same content is a replay (a no-op,
    /// durable once what is queued is), different content is a conflict.
    fn replay(
        &self,
        state: &State,
        candidate: &Transfer,
    ) -> Result<Option<Durable<Posted>>, LedgerError> {
        match self.shared.find_posted(state, candidate.id)? {
            None => Ok(None),
            Some(existing) if existing.same_content(candidate) => Ok(Some(self.shared.durable(
                Posted {
                    transfer: existing,
                    replayed: true,
                },
                state.seq_last,
            ))),
            Some(_) => Err(LedgerError::TransferConflict { id: candidate.id }),
        }
    }

    /// The latest `limit` transfers of an account, newest first (durable ones: call after
    /// [`Ledger::flush`] to include everything).
    pub fn history(&self, id: AccountId, limit: usize) -> Result<Vec<Transfer>, LedgerError> {
        Ok(self.shared.store.transfers_of(id, limit)?)
    }

    /// Waits until every change queued so far is durable.
    pub fn flush(&self) -> Result<(), LedgerError> {
        let seq = {
            let state = self.shared.lock_with(&[])?;
            state.seq_last
        };
        self.shared.work.notify_one();
        self.shared.durable.wait(seq)
    }

    /// Whether the ledger decides anything now: it refuses everything after a failed commit,
    /// until its store takes writes again.
    pub fn check_open(&self) -> Result<(), LedgerError> {
        self.shared.lock_with(&[]).map(drop)
    }

    /// What the group-commit writer has done so far.
    pub fn writer_stats(&self) -> WriterStats {
        *self.shared.stats.lock()
    }

    /// How many reservations are open.
    pub fn open_reservations(&self) -> usize {
        self.shared.state.lock().reservations.len()
    }

    /// How many accounts are held in memory.
    pub fn accounts_loaded(&self) -> usize {
        self.shared.state.lock().accounts.len()
    }

    /// Checks the in-memory invariants over every loaded account and open reservation; returns
    /// the violations (none when all hold). For tests and `ledger verify` on a running server.
    pub fn check_invariants(&self) -> Vec<String> {
        let state = self.shared.state.lock();
        let mut violations = Vec::new();
        let mut held: HashMap<AccountId, (u64, u32)> = HashMap::new();
        for reservation in state.reservations.values() {
            let entry = held.entry(reservation.account).or_default();
            entry.0 += reservation.amount_cu;
            entry.1 += 1;
        }
        for (id, account) in &state.accounts {
            let (reserved_cu, open) = held.get(id).copied().unwrap_or_default();
            if reserved_cu != account.reserved_cu || open != account.open_reservations {
                violations.push(format!(
                    "account {id}: holds {} cu in {} reservations, but its reservations sum to {reserved_cu} cu in {open}",
                    account.reserved_cu, account.open_reservations
                ));
            }
            if let Err(violation) = account.balance.check(*id) {
                violations.push(violation);
            }
            if account.kind().holds_grants()
                && i128::from(account.reserved_cu) > i128::from(account.balance.balance_cu)
            {
                violations.push(format!(
                    "account {id}: reserved {} exceeds balance {} (available would be negative)",
                    account.reserved_cu, account.balance.balance_cu
                ));
            }
        }
        violations
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        {
            let mut state = self.shared.state.lock();
            state.shutdown = true;
        }
        self.shared.work.notify_all();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("the ledger writer panicked");
        }
    }
}

/// The group-commit writer: takes everything queued, writes it in one durable transaction,
/// then wakes everyone waiting on it. Every checkpoint interval (or when many accounts have
/// changed, or on close) the batch also carries the state of every account changed since the
/// last checkpoint, taken under the same lock as the queue, so it reflects exactly the
/// transfers up to the batch's end.
///
/// A failed commit fails the ledger closed: the in-memory state is ahead of the disk, so nothing
/// more is decided until the store takes writes again (probed every [`RECOVERY_INTERVAL`]), and
/// then the ledger reloads from it as a restart would ([`Shared::reset`]).
fn run_writer(shared: &Shared) {
    while write_until_failure(shared) {
        if !wait_for_the_store(shared) {
            return;
        }
    }
}

/// After a failed commit: probes the store until it takes writes, then resets the ledger onto
/// it. Returns false if the ledger is shutting down first.
fn wait_for_the_store(shared: &Shared) -> bool {
    loop {
        {
            let mut state = shared.state.lock();
            if state.shutdown {
                return false;
            }
            shared.work.wait_for(&mut state, RECOVERY_INTERVAL);
            if state.shutdown {
                return false;
            }
        }
        if let Err(error) = shared.store.probe_write() {
            tracing::debug!(%error, "the store does not take writes yet");
            continue;
        }
        match shared.reset() {
            Ok(()) => {
                tracing::warn!(
                    "the store takes writes again; the ledger reloaded from it and reopened"
                );
                return true;
            }
            Err(error) => {
                tracing::warn!(%error, "the ledger could not reload from the store yet");
                let mut state = shared.state.lock();
                state.failure = Some(format!(
                    "the ledger could not reload from the store ({error})"
                ));
            }
        }
    }
}

/// Writes what is queued until the ledger shuts down (false) or a commit fails (true).
fn write_until_failure(shared: &Shared) -> bool {
    let options = &shared.options;
    let mut last_checkpoint = Instant::now();
    let checkpoint_due = |state: &State, last_checkpoint: Instant| {
        !state.dirty.is_empty()
            && ((state.shutdown && options.checkpoint_on_close)
                || last_checkpoint.elapsed() >= options.checkpoint_interval
                || state.dirty.len() >= options.checkpoint_dirty_max)
    };
    loop {
        let mut state = shared.state.lock();
        while state.queue.is_empty() && !state.shutdown && !checkpoint_due(&state, last_checkpoint)
        {
            if state.dirty.is_empty() {
                shared.work.wait(&mut state);
            } else {
                let left = options
                    .checkpoint_interval
                    .saturating_sub(last_checkpoint.elapsed())
                    .max(Duration::from_millis(1));
                shared.work.wait_for(&mut state, left);
            }
        }
        let checkpoint = checkpoint_due(&state, last_checkpoint);
        if state.queue.is_empty() && !checkpoint {
            return false; // shut down, with nothing left to write
        }
        let items: Vec<(u64, Mutation)> =
            if checkpoint || state.queue.len() <= options.commit_batch_max {
                std::mem::take(&mut state.queue)
            } else {
                state.queue.drain(..options.commit_batch_max).collect()
            };
        let updates = checkpoint.then(|| {
            let dirty = std::mem::take(&mut state.dirty);
            dirty
                .into_iter()
                .filter_map(|id| {
                    state.accounts.get(&id).map(|account| AccountUpdate {
                        id,
                        kind: account.kind(),
                        balance_cu: account.balance.balance_cu,
                        lots: account.balance.lots.to_vec(),
                        stipend_period: account.balance.stipend_period,
                        usage: account.balance.usage.clone(),
                    })
                })
                .collect::<Vec<_>>()
        });
        drop(state);
        let seq_max = items.last().map(|(seq, _)| *seq);
        let n_items = items.len() as u64;
        let mut batch = Batch {
            checkpoint: updates,
            ..Batch::default()
        };
        for (_, mutation) in items {
            match mutation {
                Mutation::Create(record) => batch.created.push(record),
                Mutation::Post(transfer) => batch.transfers.push(transfer),
            }
        }
        let started = Instant::now();
        let result = shared.store.commit(&batch);
        {
            let mut stats = shared.stats.lock();
            stats.commits += 1;
            stats.mutations += n_items;
            stats.checkpoints += u64::from(batch.checkpoint.is_some());
            stats.commit_us_total += started.elapsed().as_micros() as u64;
        }
        match result {
            Ok(()) => {
                if checkpoint {
                    last_checkpoint = Instant::now();
                }
                if let Some(seq_max) = seq_max {
                    shared.durable.advance(seq_max);
                    let mut state = shared.state.lock();
                    state.pending_transfers.retain(|_, (_, seq)| *seq > seq_max);
                    state.pending_names.retain(|_, (_, seq)| *seq > seq_max);
                    state.pending_skeletons.retain(|_, (_, seq)| *seq > seq_max);
                }
            }
            Err(error) => {
                tracing::error!(%error, "ledger commit failed; refusing all work until the store takes writes again");
                let reason = format!(
                    "a commit to the store failed ({error}); refusing all work until it takes writes again"
                );
                // Close the state first: whoever is woken by the failure below must already find
                // every door shut, or it could slip one more decision past a store that failed.
                {
                    let mut state = shared.state.lock();
                    state.failure = Some(reason.clone());
                    state.queue.clear();
                }
                shared.durable.fail(reason);
                return true;
            }
        }
    }
}
