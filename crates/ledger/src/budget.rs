//! What a gateway needs of a ledger ([`Budget`]) and what an operator does with one ([`Books`]),
//! whichever engine decides: the single-node [`Ledger`], which holds every balance, or, on a
//! database shared by several nodes, an escrow [`Node`] (the gateway's side) and the database's
//! own transactions (the operator's).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::account::{AccountId, AccountKind};
use crate::durable::Durable;
use crate::error::LedgerError;
use crate::ledger::Posted;
use crate::ledger::{AccountView, Ledger, WriterStats};
use crate::node::Node;
use crate::policy::StipendPolicy;
use crate::reservation::{Reservation, ReservationId, Settlement};
use crate::store::Store;
use crate::transfer::{Transfer, TransferId};

/// A ledger as the gateway uses it: reserve a call's worst case, settle it exactly (durably) or
/// void it, and show a person their budget.
pub trait Budget: Send + Sync {
    /// Holds `amount_cu` of `account`'s balance for a call to `sink`, for at most `timeout`.
    fn reserve(
        &self,
        account: AccountId,
        sink: AccountId,
        amount_cu: u64,
        timeout: Duration,
    ) -> Result<Reservation, LedgerError>;
    /// Charges `actual_cu` of a reservation and releases the rest; acknowledged once durable.
    fn settle(&self, id: ReservationId, actual_cu: u64)
    -> Result<Durable<Settlement>, LedgerError>;
    /// Releases a reservation whole. Returns what it held.
    fn void(&self, id: ReservationId) -> Result<u64, LedgerError>;
    /// An account as its person sees it.
    fn view(&self, id: AccountId) -> Result<AccountView, LedgerError>;
    /// The stipend policy.
    fn policy(&self) -> &StipendPolicy;
    /// Whether it decides anything now (it refuses everything after a failed commit until its
    /// store takes writes again).
    fn check_open(&self) -> Result<(), LedgerError>;
    /// What its writer has done so far.
    fn writer_stats(&self) -> WriterStats;
    /// How many reservations are open.
    fn open_reservations(&self) -> usize;
    /// The moment by which a call on reservation `id` must have ended for its charge to be
    /// kept, as known now: `None` when the hold simply lasts its timeout (one node's ledger,
    /// which holds every balance itself); on an escrow node, the end of the lease under it less
    /// the time a settle takes, moved on by each renewal of the lease, and now if the
    /// reservation is gone. A call still running then is cut short and charged what it
    /// delivered.
    fn hold_until(&self, id: ReservationId) -> Option<Instant>;
}

impl Budget for Ledger {
    fn reserve(
        &self,
        account: AccountId,
        sink: AccountId,
        amount_cu: u64,
        timeout: Duration,
    ) -> Result<Reservation, LedgerError> {
        Ledger::reserve(self, account, sink, amount_cu, timeout)
    }

    fn settle(
        &self,
        id: ReservationId,
        actual_cu: u64,
    ) -> Result<Durable<Settlement>, LedgerError> {
        Ledger::settle(self, id, actual_cu)
    }

    fn void(&self, id: ReservationId) -> Result<u64, LedgerError> {
        Ledger::void(self, id)
    }

    fn view(&self, id: AccountId) -> Result<AccountView, LedgerError> {
        Ledger::view(self, id)
    }

    fn policy(&self) -> &StipendPolicy {
        Ledger::policy(self)
    }

    fn check_open(&self) -> Result<(), LedgerError> {
        Ledger::check_open(self)
    }

    fn writer_stats(&self) -> WriterStats {
        Ledger::writer_stats(self)
    }

    fn open_reservations(&self) -> usize {
        Ledger::open_reservations(self)
    }

    fn hold_until(&self, _id: ReservationId) -> Option<Instant> {
        None
    }
}

impl Budget for Node {
    fn reserve(
        &self,
        account: AccountId,
        sink: AccountId,
        amount_cu: u64,
        timeout: Duration,
    ) -> Result<Reservation, LedgerError> {
        Node::reserve(self, account, sink, amount_cu, timeout)
    }

    fn settle(
        &self,
        id: ReservationId,
        actual_cu: u64,
    ) -> Result<Durable<Settlement>, LedgerError> {
        Node::settle(self, id, actual_cu)
    }

    fn void(&self, id: ReservationId) -> Result<u64, LedgerError> {
        Node::void(self, id)
    }

    fn view(&self, id: AccountId) -> Result<AccountView, LedgerError> {
        Node::view(self, id)
    }

    fn policy(&self) -> &StipendPolicy {
        Node::policy(self)
    }

    fn check_open(&self) -> Result<(), LedgerError> {
        Node::check_open(self)
    }

    fn writer_stats(&self) -> WriterStats {
        Node::writer_stats(self)
    }

    fn open_reservations(&self) -> usize {
        Node::open_reservations(self)
    }

    fn hold_until(&self, id: ReservationId) -> Option<Instant> {
        Some(Node::hold_until(self, id))
    }
}

/// The operator's side of a ledger: accounts, grants, gifts, listings and the in-memory audit.
/// Every change is durable when the call returns.
pub trait Books: Send + Sync {
    /// Finds an account's id by name (NFKC-normalized, as names are stored).
    fn account_id(&self, name: &str) -> Result<AccountId, LedgerError>;
    /// An account as its person sees it.
    fn view(&self, id: AccountId) -> Result<AccountView, LedgerError>;
    /// Up to `limit` accounts after `after`, in id order.
    fn views(
        &self,
        after: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountView>, LedgerError>;
    /// Creates a person or pool account (its name normalized and held apart from look-alikes).
    fn create_account(&self, name: &str, kind: AccountKind) -> Result<AccountId, LedgerError>;
    /// Finds or creates a model's sink account.
    fn sink(&self, name: &str) -> Result<AccountId, LedgerError>;
    /// An operator's grant from the issuer; idempotent by `id`.
    fn grant(
        &self,
        id: TransferId,
        to: AccountId,
        amount_cu: u64,
        expires_at_ms: Option<i64>,
    ) -> Result<Posted, LedgerError>;
    /// A gift or pool contribution; idempotent by `id`.
    fn give(
        &self,
        id: TransferId,
        from: AccountId,
        to: AccountId,
        amount_cu: u64,
    ) -> Result<Posted, LedgerError>;
    /// Closes a person's or pool's account for good (`Ledger::close`): its whole balance back to
    /// the issuer, nothing held for calls in flight. `None` when it was closed already.
    fn close(&self, id: AccountId) -> Result<Option<Posted>, LedgerError>;
    /// Gives a closed account its anonymous name, erasing the old one and its keys' names.
    fn erase_names(&self, id: AccountId, anonymous_name: &str) -> Result<(), LedgerError>;
    /// The latest `limit` transfers other than spends that name the account, newest first.
    fn history(&self, id: AccountId, limit: usize) -> Result<Vec<Transfer>, LedgerError>;
    /// What is wrong in memory (nothing, for books kept in the database alone).
    fn check_invariants(&self) -> Vec<String>;
    /// The stipend policy.
    fn policy(&self) -> &StipendPolicy;
    /// Now, by the ledger's clock.
    fn now_ms(&self) -> i64;
    /// The store, for the API keys.
    fn store(&self) -> Arc<dyn Store>;
    /// Waits until every change decided so far is in the store (books kept in the database
    /// alone have nothing to wait for).
    fn flush(&self) -> Result<(), LedgerError> {
        Ok(())
    }
}

impl Books for Ledger {
    fn account_id(&self, name: &str) -> Result<AccountId, LedgerError> {
        Ledger::account_id(self, name)
    }

    fn view(&self, id: AccountId) -> Result<AccountView, LedgerError> {
        Ledger::view(self, id)
    }

    fn views(
        &self,
        after: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountView>, LedgerError> {
        Ledger::views(self, after, limit)
    }

    fn create_account(&self, name: &str, kind: AccountKind) -> Result<AccountId, LedgerError> {
        Ledger::create_account(self, name, kind)?.wait()
    }

    fn sink(&self, name: &str) -> Result<AccountId, LedgerError> {
        Ledger::sink(self, name)
    }

    fn grant(
        &self,
        id: TransferId,
        to: AccountId,
        amount_cu: u64,
        expires_at_ms: Option<i64>,
    ) -> Result<Posted, LedgerError> {
        Ledger::grant(self, id, to, amount_cu, expires_at_ms)?.wait()
    }

    fn give(
        &self,
        id: TransferId,
        from: AccountId,
        to: AccountId,
        amount_cu: u64,
    ) -> Result<Posted, LedgerError> {
        Ledger::give(self, id, from, to, amount_cu)?.wait()
    }

    fn flush(&self) -> Result<(), LedgerError> {
        Ledger::flush(self)
    }

    fn close(&self, id: AccountId) -> Result<Option<Posted>, LedgerError> {
        Ledger::close(self, id)?.wait()
    }

    fn erase_names(&self, id: AccountId, anonymous_name: &str) -> Result<(), LedgerError> {
        Ledger::erase_names(self, id, anonymous_name)
    }

    fn history(&self, id: AccountId, limit: usize) -> Result<Vec<Transfer>, LedgerError> {
        Ledger::flush(self)?;
        Ledger::history(self, id, limit)
    }

    fn check_invariants(&self) -> Vec<String> {
        Ledger::check_invariants(self)
    }

    fn policy(&self) -> &StipendPolicy {
        Ledger::policy(self)
    }

    fn now_ms(&self) -> i64 {
        Ledger::now_ms(self)
    }

    fn store(&self) -> Arc<dyn Store> {
        Ledger::store(self)
    }
}
