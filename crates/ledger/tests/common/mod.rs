//! Shared helpers for the ledger's integration tests: a real store, SQLite in a temp dir or
//! PostgreSQL on a server of the tests' own, so that each behaviour is checked on both.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use stipend_ledger::{
    Ledger, LedgerOptions, ManualClock, StipendPolicy, Store, VerifyReport, verify,
};
use stipend_store_postgres::PostgresStore;
use stipend_store_postgres::test_server::TestServer;
use stipend_store_sqlite::SqliteStore;

/// Which store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

thread_local! {
    static BACKEND: Cell<Backend> = const { Cell::new(Backend::Sqlite) };
}

/// Runs a test with its stores on `backend`.
pub fn on(backend: Backend, test: fn()) {
    BACKEND.set(backend);
    test();
}

/// The store the running test uses.
pub fn backend() -> Backend {
    BACKEND.get()
}

/// One PostgreSQL server for all of a test binary's tests; each test takes a database of its own.
pub fn pg_server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| TestServer::start().unwrap())
}

/// Where a store lives.
#[derive(Debug, Clone)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// A fresh, empty store on the running test's backend (`dir` holds an SQLite file).
    pub fn fresh(dir: &Path) -> Location {
        match backend() {
            Backend::Sqlite => Location::Sqlite(dir.join("ledger.db")),
            Backend::Postgres => Location::Postgres(pg_server().fresh_database().unwrap()),
        }
    }

    /// Opens it for writing.
    pub fn open(&self) -> Arc<dyn Store> {
        match self {
            Location::Sqlite(path) => Arc::new(SqliteStore::open(path).unwrap()),
            Location::Postgres(url) => Arc::new(PostgresStore::open(url).unwrap()),
        }
    }

    /// Opens it for reading beside a writer.
    pub fn open_read_only(&self) -> Box<dyn Store> {
        match self {
            Location::Sqlite(path) => Box::new(SqliteStore::open_read_only(path).unwrap()),
            Location::Postgres(url) => Box::new(PostgresStore::open_read_only(url).unwrap()),
        }
    }

    /// Audits the whole store.
    pub fn audit(&self) -> VerifyReport {
        verify(self.open_read_only().as_ref()).unwrap()
    }
}

/// Turns each named test function into two tests, one on each store:
/// `sqlite::NAME` and `postgres::NAME`.
#[allow(unused_macros)]
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    crate::common::on(crate::common::Backend::Sqlite, super::$name);
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    crate::common::on(crate::common::Backend::Postgres, super::$name);
                }
            )*
        }
    };
}

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
    pub location: Location,
    pub clock: Arc<ManualClock>,
    pub policy: StipendPolicy,
    pub ledger: Option<Ledger>,
}

impl Harness {
    pub fn new(policy: StipendPolicy) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let mut harness = Harness {
            location: Location::fresh(dir.path()),
            dir,
            clock,
            policy,
            ledger: None,
        };
        harness.reopen();
        harness
    }

    pub fn ledger(&self) -> &Ledger {
        self.ledger.as_ref().unwrap()
    }

    /// Closes the ledger (flushing what is queued) and opens it again from the store.
    pub fn reopen(&mut self) {
        self.ledger = None;
        let store = self.location.open();
        self.ledger =
            Some(Ledger::open(store, self.clock.clone(), LedgerOptions::new(self.policy)).unwrap());
    }

    /// Flushes and audits the whole store.
    pub fn verify(&self) -> VerifyReport {
        self.ledger().flush().unwrap();
        self.location.audit()
    }
}
