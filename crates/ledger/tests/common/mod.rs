//! Shared helpers for the ledger's integration tests: a real SQLite store in a temp dir.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use stipend_ledger::{
    Clock, Ledger, LedgerOptions, ManualClock, StipendPolicy, Store, VerifyReport, verify,
};
use stipend_store_sqlite::SqliteStore;

pub const DAY_MS: i64 = 86_400_000;
/// A moment in the middle of a day, so period boundaries are explicit in tests.
pub const T0: i64 = 20_000 * DAY_MS + DAY_MS / 2;

pub fn policy(amount_cu: u64, rollover_max_cu: u64) -> StipendPolicy {
    StipendPolicy::new(
        amount_cu,
        Duration::from_millis(DAY_MS as u64),
        rollover_max_cu,
    )
    .unwrap()
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub policy: StipendPolicy,
    pub ledger: Option<Ledger>,
}

impl Harness {
    pub fn new(policy: StipendPolicy) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let mut harness = Harness {
            dir,
            clock,
            policy,
            ledger: None,
        };
        harness.reopen();
        harness
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }

    pub fn ledger(&self) -> &Ledger {
        self.ledger.as_ref().unwrap()
    }

    /// Closes the ledger (flushing what is queued) and opens it again from the store.
    pub fn reopen(&mut self) {
        self.ledger = None;
        self.ledger = Some(open(&self.path(), self.clock.clone(), self.policy));
    }

    /// Flushes and audits the whole store.
    pub fn verify(&self) -> VerifyReport {
        self.ledger().flush().unwrap();
        audit(&self.path())
    }
}

pub fn open(path: &Path, clock: Arc<dyn Clock>, policy: StipendPolicy) -> Ledger {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(path).unwrap());
    Ledger::open(store, clock, LedgerOptions::new(policy)).unwrap()
}

pub fn audit(path: &Path) -> VerifyReport {
    let store = SqliteStore::open_read_only(path).unwrap();
    verify(&store).unwrap()
}
