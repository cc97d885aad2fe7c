//! The Stipend ledger: every person's compute budget, exact, never overspent, durable.
//!
//! Amounts are integer compute units (cu, 1 GFLOP each). Every change is a [`Transfer`] between
//! two accounts (double entry), so all balances sum to zero. Persons receive a periodic stipend,
//! applied lazily when their account is next touched. A request [`Ledger::reserve`]s its worst
//! case in memory, then [`Ledger::settle`]s the exact usage, durably, through a group-commit
//! writer, or [`Ledger::void`]s it. The ledger knows nothing of HTTP or models, and does no
//! network I/O of its own: storage sits behind the [`Store`] trait.

pub mod account;
pub mod clock;
pub mod error;
pub mod ledger;
pub mod policy;
pub mod reservation;
pub mod state;
pub mod store;
pub mod transfer;
pub mod units;
pub mod verify;

pub use account::{AccountId, AccountKind, AccountRecord, Lot, LotSource, Usage};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::LedgerError;
pub use ledger::{
    AccountView, Durable, DurableFuture, ISSUER_NAME, Ledger, LedgerOptions, Posted,
    RESERVATION_TIMEOUT_MAX_DEFAULT, WriterStats,
};
pub use policy::StipendPolicy;
pub use reservation::{Reservation, ReservationId, Settlement};
pub use store::{AccountUpdate, AuditRow, Batch, KeyRecord, Store, StoreError, TransferAudit};
pub use transfer::{Transfer, TransferId, TransferKind};
pub use units::Flops;
pub use verify::{VerifyReport, verify};
