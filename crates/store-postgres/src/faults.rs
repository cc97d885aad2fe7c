//! For tests: the database as a node sees it, with faults injected on the way. A lost commit
//! answer (the commit happened, or never reached the database) and refused lease renewals are
//! what a connection dropping at the wrong moment, or a database too slow to answer, look like
//! to a node; a real server cannot be made to fail at exactly that point.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use stipend_ledger::escrow::{Lease, LeaseSpend, SpendOutcome};
use stipend_ledger::node::EscrowStore;
use stipend_ledger::{AccountId, AccountRecord, StoreError, TransferId};

use crate::PostgresEscrow;

/// A [`PostgresEscrow`] that fails where a test says.
pub struct FaultyEscrow {
    inner: PostgresEscrow,
    /// The next settle commit's answer is lost: `Some(true)` after committing, `Some(false)`
    /// without.
    lose_next_answer: Mutex<Option<bool>>,
    refuse_renewals: AtomicBool,
    renewals_refused: AtomicU64,
}

impl FaultyEscrow {
    /// No faults until asked for.
    pub fn new(inner: PostgresEscrow) -> FaultyEscrow {
        FaultyEscrow {
            inner,
            lose_next_answer: Mutex::new(None),
            refuse_renewals: AtomicBool::new(false),
            renewals_refused: AtomicU64::new(0),
        }
    }

    /// Loses the next settle commit's answer: after it was committed, or before it reached the
    /// database.
    pub fn lose_next_answer(&self, committed: bool) {
        *self.lose_next_answer.lock() = Some(committed);
    }

    /// Fails every lease renewal (a connection error) while `refuse` holds.
    pub fn refuse_renewals(&self, refuse: bool) {
        self.refuse_renewals.store(refuse, Ordering::SeqCst);
    }

    /// How many renewals were refused so far.
    pub fn renewals_refused(&self) -> u64 {
        self.renewals_refused.load(Ordering::SeqCst)
    }
}

fn connection_closed() -> StoreError {
    StoreError::Io("the connection closed (an injected fault)".to_string())
}

impl EscrowStore for FaultyEscrow {
    fn take_lease(
        &self,
        account: AccountId,
        want_cu: u64,
        min_cu: u64,
        now_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        self.inner.take_lease(account, want_cu, min_cu, now_ms)
    }

    fn renew_lease(&self, lease: i64) -> Result<bool, StoreError> {
        if self.refuse_renewals.load(Ordering::SeqCst) {
            self.renewals_refused.fetch_add(1, Ordering::SeqCst);
            return Err(connection_closed());
        }
        self.inner.renew_lease(lease)
    }

    fn release_lease(&self, lease: i64) -> Result<u64, StoreError> {
        self.inner.release_lease(lease)
    }

    fn shrink_lease(&self, lease: i64, amount_cu: u64) -> Result<bool, StoreError> {
        self.inner.shrink_lease(lease, amount_cu)
    }

    fn settle_leased(&self, spends: &[LeaseSpend]) -> Result<Vec<SpendOutcome>, StoreError> {
        let lost = self.lose_next_answer.lock().take();
        match lost {
            Some(true) => {
                self.inner.settle_leased(spends)?;
                Err(connection_closed())
            }
            Some(false) => Err(connection_closed()),
            None => self.inner.settle_leased(spends),
        }
    }

    fn reclaim_expired_leases(&self) -> Result<u64, StoreError> {
        self.inner.reclaim_expired_leases()
    }

    fn settled(&self, first: TransferId) -> Result<bool, StoreError> {
        self.inner.settled(first)
    }

    fn account_held(&self, id: AccountId) -> Result<Option<(AccountRecord, u64)>, StoreError> {
        self.inner.account_held(id)
    }

    fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl()
    }
}
