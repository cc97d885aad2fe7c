//! The ledger's typed errors: each carries the facts a caller needs to explain itself.

use crate::account::{AccountId, AccountKind};
use crate::reservation::ReservationId;
use crate::store::StoreError;
use crate::transfer::TransferId;
use crate::units::Flops;

/// Why a ledger operation was refused. A refused operation changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// No account has this name or id.
    #[error("no account named {name:?}")]
    UnknownAccount {
        /// The name or id asked for.
        name: String,
    },
    /// The name is taken.
    #[error("an account named {name:?} already exists")]
    AccountExists {
        /// The name.
        name: String,
    },
    /// The name looks like one that exists (the same letters in another case or script, or
    /// characters that are drawn alike), so that one could be taken for the other.
    #[error(
        "the account name {name:?} is too like the existing {existing:?}; choose one that cannot \
         be taken for it"
    )]
    NameConfusable {
        /// The name asked for, normalized.
        name: String,
        /// The existing name it could be taken for.
        existing: String,
    },
    /// The name is not usable.
    #[error("invalid account name: {reason}")]
    InvalidName {
        /// Why.
        reason: String,
    },
    /// Zero, or too large.
    #[error("invalid amount: {reason}")]
    InvalidAmount {
        /// Why.
        reason: String,
    },
    /// The transfer would take an account's balance past what the ledger can hold (an `i64` of
    /// cu, either way). Nothing moved.
    #[error(
        "account {account}'s balance would pass the ledger's limit of ±{} cu; nothing moved",
        i64::MAX
    )]
    BalanceLimit {
        /// The account.
        account: AccountId,
    },
    /// The account cannot cover the amount.
    #[error(
        "account {account} has {} available and needs {}; the next stipend arrives at {}",
        Flops(*available_cu as i64),
        Flops(*needed_cu as i64),
        next_grant_at_ms.map(crate::units::format_utc).unwrap_or_else(|| "never".to_string())
    )]
    InsufficientBalance {
        /// The account.
        account: AccountId,
        /// What was asked for, in cu.
        needed_cu: u64,
        /// What is available, in cu.
        available_cu: u64,
        /// When the next stipend arrives (ms since the epoch), if the account receives one.
        next_grant_at_ms: Option<i64>,
    },
    /// The operation does not apply to this kind of account.
    #[error("account {account} is a {kind} account and cannot {operation}")]
    WrongKind {
        /// The account.
        account: AccountId,
        /// Its kind.
        kind: AccountKind,
        /// What was attempted.
        operation: &'static str,
    },
    /// The account holds compute for calls or runs in flight, so it cannot be closed yet.
    #[error(
        "account {account} holds {reserved_cu} cu for calls or runs in flight; it can be closed once they end"
    )]
    AccountBusy {
        /// The account.
        account: AccountId,
        /// What is held.
        reserved_cu: u64,
    },
    /// A transfer from an account to itself.
    #[error("an account cannot give to itself")]
    SameAccount,
    /// The reservation is not open: unknown, already settled or voided, or timed out.
    #[error("reservation {id} is not open (unknown, already settled or voided, or timed out)")]
    UnknownReservation {
        /// The reservation.
        id: ReservationId,
    },
    /// The timeout is zero or longer than allowed.
    #[error("invalid reservation timeout: {reason}")]
    InvalidTimeout {
        /// Why.
        reason: String,
    },
    /// The transfer id was used before for a different transfer.
    #[error("transfer id {id} was already used for a different transfer")]
    TransferConflict {
        /// The id.
        id: TransferId,
    },
    /// The account holds too many separately dated lots to accept another.
    #[error(
        "account {account} holds too many separately dated grants; try again after some expire"
    )]
    TooManyLots {
        /// The account.
        account: AccountId,
    },
    /// A limit on in-flight work is reached; try again shortly.
    #[error("the ledger is at capacity ({what}); try again shortly")]
    Overloaded {
        /// Which limit.
        what: &'static str,
    },
    /// The store failed, so the ledger refuses everything until restarted (fail closed).
    #[error("the ledger is unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
    },
    /// Reading the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
