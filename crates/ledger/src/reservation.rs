//! Reservations: compute held for a request in flight, then settled or voided.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::account::AccountId;
use crate::transfer::TransferId;

/// A reservation's id: a random per-start prefix and a counter, so that an id from before a
/// restart never names a reservation made after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub u128);

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl Serialize for ReservationId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ReservationId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        u128::from_str_radix(&text, 16)
            .map(ReservationId)
            .map_err(|_| serde::de::Error::custom(format!("{text:?} is not a reservation id")))
    }
}

/// An open reservation: `amount_cu` of `account`'s balance held until it is settled, voided, or
/// its deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub(crate) id: ReservationId,
    pub(crate) account: AccountId,
    pub(crate) sink: AccountId,
    pub(crate) amount_cu: u64,
    pub(crate) expires_at_ms: i64,
}

impl Reservation {
    /// Its id.
    pub fn id(&self) -> ReservationId {
        self.id
    }
    /// The account it holds compute of.
    pub fn account(&self) -> AccountId {
        self.account
    }
    /// Where the compute goes when it is settled.
    pub fn sink(&self) -> AccountId {
        self.sink
    }
    /// How much it holds, in cu.
    pub fn amount_cu(&self) -> u64 {
        self.amount_cu
    }
    /// When it is voided if not settled (ms since the epoch).
    pub fn expires_at_ms(&self) -> i64 {
        self.expires_at_ms
    }
}

/// What a settle did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// The reservation settled.
    pub reservation: ReservationId,
    /// What was charged, in cu.
    pub charged_cu: u64,
    /// What was asked beyond what the account could cover, in cu (not charged).
    pub shortfall_cu: u64,
    /// What was held and given back, in cu.
    pub released_cu: u64,
    /// The spend transfer, when anything was charged.
    pub transfer: Option<TransferId>,
}
