//! What a gateway needs of a ledger, whichever engine decides: the single-node [`Ledger`], which
//! holds every balance, or an escrow [`Node`], which holds leases on them.

use std::time::Duration;

use crate::account::AccountId;
use crate::durable::Durable;
use crate::error::LedgerError;
use crate::ledger::{AccountView, Ledger, WriterStats};
use crate::node::Node;
use crate::policy::StipendPolicy;
use crate::reservation::{Reservation, ReservationId, Settlement};

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
}
