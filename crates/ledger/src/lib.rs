//! The Stipend ledger: every person's compute budget, exact, never overspent, durable.
//!
//! Amounts are integer compute units (cu, 1 GFLOP each). Every change is a [`Transfer`] between
//! two accounts (double entry), so all balances sum to zero. Persons receive a periodic stipend,
//! applied lazily when their account is next touched. A request [`Ledger::reserve`]s its worst
//! case in memory, then [`Ledger::settle`]s the exact usage, durably, through a group-commit
//! writer, or [`Ledger::void`]s it. The ledger knows nothing of HTTP or models, and does no
//! network I/O of its own: storage sits behind the [`Store`] trait.

/// Implements `Serialize` and `Deserialize` for a leaf enum through its `as_str` and `parse`, so
/// that its one list of names serves storage, the CLI, JSON and the control socket alike, and a
/// renamed variant cannot change any of them unseen.
macro_rules! serde_by_name {
    ($type:ty, $what:literal) => {
        impl serde::Serialize for $type {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                <$type>::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format!(concat!("{:?} is not ", $what), text))
                })
            }
        }
    };
}

pub mod account;
pub mod budget;
pub mod clock;
pub mod durable;
pub mod error;
pub mod escrow;
pub mod ledger;
pub mod limits;
pub mod node;
pub mod policy;
pub mod reservation;
mod state;
pub mod store;
pub mod transfer;
pub mod units;
pub mod verify;

pub use account::{
    ACCOUNT_NAME_SKELETON_VERSION, AccountId, AccountKind, AccountName, AccountRecord, Lot,
    LotSource, SINK_NAME_PREFIX, Usage, account_name_skeleton, normalize_account_name,
    usage_by_day, usage_in_period,
};
pub use budget::{Books, Budget};
pub use clock::{Clock, ManualClock, SystemClock};
pub use durable::{Durable, DurableFuture};
pub use error::LedgerError;
pub use ledger::{
    AccountView, CLOSED_NAME_PREFIX, ISSUER_NAME, Ledger, Posted, WriterStats, check_name_reserved,
    first_day_kept,
};
pub use limits::{ACCOUNT_NAME_LEN_MAX, LedgerOptions, RESERVATION_TIMEOUT_MAX_DEFAULT};
pub use policy::StipendPolicy;
pub use reservation::{Reservation, ReservationId, Settlement};
pub use store::{
    AccessRules, AccountUpdate, AuditRow, Batch, JournalRecord, KeptReport, KeyCap, KeyRecord,
    KeySpend, ModelAccess, OperatorAction, RunJournal, Store, StoreError, TransferAudit,
    check_group_name,
};
pub use transfer::{Transfer, TransferId, TransferKind};
pub use units::Flops;
pub use verify::{VerifyReport, verify};
