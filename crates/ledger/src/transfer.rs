//! Transfers: every change to a balance is one, from one account to another.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::account::AccountId;

/// A transfer's unique id. Replaying an id is a no-op; reusing it for different content is an
/// error. Shown as 32 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(pub u128);

/// A random number for an engine's id prefixes (transfers, reservations), so that ids from one
/// start never name those of another: the low half of a fresh random id.
pub(crate) fn random_u64() -> u64 {
    TransferId::random().0 as u64
}

impl TransferId {
    /// A fresh random id.
    pub fn random() -> TransferId {
        let mut bytes = [0u8; 16];
        // The OS random source only fails on platforms we do not run on; fall back to the clock
        // and a counter so that ids stay unique even then.
        if getrandom::fill(&mut bytes).is_err() {
            static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return TransferId((now << 64) ^ u128::from(count));
        }
        TransferId(u128::from_be_bytes(bytes))
    }

    /// Parses 1 to 32 hex digits (dashes allowed, so a UUID works).
    pub fn parse(text: &str) -> Option<TransferId> {
        let hex: String = text.chars().filter(|c| *c != '-').collect();
        if hex.is_empty() || hex.len() > 32 {
            return None;
        }
        u128::from_str_radix(&hex, 16).ok().map(TransferId)
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for TransferId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TransferId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        TransferId::parse(&text)
            .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a transfer id")))
    }
}

/// What a transfer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransferKind {
    /// The periodic stipend, issuer → person (possibly several periods at once).
    Stipend,
    /// An operator's extra grant, issuer → account.
    Grant,
    /// Unspent compute past its expiry, account → issuer.
    Expiry,
    /// Unspent stipend over the rollover cap at a period boundary, person → issuer.
    Rollover,
    /// Compute spent on a model call, account → sink.
    Spend,
    /// A gift from one person (or pool) to another.
    Gift,
    /// A contribution to a pool.
    PoolContribution,
    /// A person's or pool's whole balance back to the issuer as the account is closed (possibly
    /// nothing); the account is closed by it.
    Closure,
}

impl TransferKind {
    /// The name used in storage, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            TransferKind::Stipend => "stipend",
            TransferKind::Grant => "grant",
            TransferKind::Expiry => "expiry",
            TransferKind::Rollover => "rollover",
            TransferKind::Spend => "spend",
            TransferKind::Gift => "gift",
            TransferKind::PoolContribution => "pool_contribution",
            TransferKind::Closure => "closure",
        }
    }

    /// Parses [`TransferKind::as_str`]'s output.
    pub fn parse(text: &str) -> Option<TransferKind> {
        Some(match text {
            "stipend" => TransferKind::Stipend,
            "grant" => TransferKind::Grant,
            "expiry" => TransferKind::Expiry,
            "rollover" => TransferKind::Rollover,
            "spend" => TransferKind::Spend,
            "gift" => TransferKind::Gift,
            "pool_contribution" => TransferKind::PoolContribution,
            "closure" => TransferKind::Closure,
            _ => return None,
        })
    }
}

serde_by_name!(TransferKind, "a transfer kind");

/// One posted movement of compute. Double entry: `amount_cu` leaves `debit` and reaches `credit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Unique id.
    pub id: TransferId,
    /// What it is for.
    pub kind: TransferKind,
    /// The account the compute leaves.
    pub debit: AccountId,
    /// The account the compute reaches.
    pub credit: AccountId,
    /// How much, in cu; always positive.
    pub amount_cu: u64,
    /// When it was posted (ms since the UNIX epoch).
    pub created_at_ms: i64,
    /// For a grant or a stipend: when the lot it creates expires (`None`: never).
    pub lot_expires_at_ms: Option<i64>,
    /// For a stipend: the period it brings the account up to.
    pub period: Option<i64>,
}

impl Transfer {
    /// Whether two transfers with the same id describe the same movement, so that replaying
    /// one is a no-op rather than a conflict. Times are not part of the content: a retried
    /// `grant --expires-in 30d` computes a later expiry, and is still the same grant.
    pub fn same_content(&self, other: &Transfer) -> bool {
        self.id == other.id
            && self.kind == other.kind
            && self.debit == other.debit
            && self.credit == other.credit
            && self.amount_cu == other.amount_cu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse() {
        let id = TransferId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(id.to_string(), "0123456789abcdef0011223344556677");
        assert_eq!(TransferId::parse(&id.to_string()), Some(id));
        assert_eq!(
            TransferId::parse("01234567-89ab-cdef-0011-223344556677"),
            Some(id)
        );
        assert_eq!(TransferId::parse("7"), Some(TransferId(7)));
        assert_eq!(TransferId::parse("xyz"), None);
        assert_eq!(TransferId::parse(""), None);
        assert_eq!(TransferId::parse(&"f".repeat(33)), None);
        assert_ne!(TransferId::random(), TransferId::random());
    }
}
