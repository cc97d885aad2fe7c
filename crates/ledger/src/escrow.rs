//! Escrow: the rules by which several nodes share one database's balances.
//!
//! With one node, the [`Ledger`](crate::Ledger) holds every balance in memory and the store is
//! its log. With several, the database holds each grant-holding account's balance, and a node
//! spends only what it has *leased* of it: a lease moves nothing, it marks part of the available
//! balance as held (`held_cu`) for one node until it is spent, given back or expired. The
//! database keeps `held_cu ≤ balance_cu` for every such account (a constraint, checked on every
//! statement), so the sum of all leases and all settled spends never exceeds what the person has,
//! however many nodes there are and whatever they do.
//!
//! This module is the part of that which is arithmetic: what a row looks like after its due
//! stipends and expiries ([`bring_up_to_date`]), after a spend ([`spend`]), a grant or a gift. The
//! store runs each inside a transaction that holds the row's lock, through the same
//! `state::apply` as everything else, so a balance changes one way only. The issuer's and the
//! sinks' rows are not rewritten by these: every node would contend for them on every stipend and
//! every settle. Their balances are the sums of their transfers, which the log holds.

use std::time::Duration;

use crate::account::{AccountId, AccountKind, AccountRecord, Lot};
use crate::policy::StipendPolicy;
use crate::state::{ApplyError, Balance, apply};
use crate::transfer::{Transfer, TransferId, TransferKind};

/// A lease a node holds on an account's balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its number, unique in the database.
    pub id: i64,
    /// The account it holds compute of.
    pub account: AccountId,
    /// What it held when granted, in cu.
    pub granted_cu: u64,
    /// What was left available of the account after it was granted, in cu: how a node sizes its
    /// next lease.
    pub available_cu: u64,
    /// How long it lives from the moment it was granted, by the database's clock. The node
    /// stops spending on it a margin before that, by its own monotonic clock.
    pub ttl: Duration,
}

/// One spend against a lease, for the store to commit with others in one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSpend {
    /// The lease it was decided against.
    pub lease: i64,
    /// The spend itself (account → sink).
    pub transfer: Transfer,
}

/// What committing a spend did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendOutcome {
    /// Charged against its lease, which was still live.
    Charged,
    /// The lease had expired or gone (a node past its deadline: a bug or a clock gone wrong), so
    /// it was charged against what the account had available instead, as far as that went.
    Unleased {
        /// What could not be charged, in cu.
        shortfall_cu: u64,
    },
}

/// The issuer as a stand-in: its balance is the sum of its transfers, not a row anyone
/// rewrites, so each transfer is applied against a fresh one.
fn issuer() -> Balance {
    Balance {
        kind: AccountKind::Issuer,
        balance_cu: 0,
        lots: crate::policy::Lots::default(),
        stipend_period: None,
        usage: Vec::new(),
    }
}

fn sink() -> Balance {
    Balance {
        kind: AccountKind::Sink,
        ..issuer()
    }
}

fn write_back(record: &mut AccountRecord, balance: Balance) {
    record.kind = balance.kind;
    record.balance_cu = balance.balance_cu;
    record.lots = balance.lots.as_slice().to_vec();
    record.stipend_period = balance.stipend_period;
    record.usage = balance.usage;
}

/// Whether a row has nothing due at `now_ms`: this period's stipend applied (for a person) and
/// no lot past its expiry. Then a lease can be taken with one conditional statement; otherwise
/// the row is brought up to date first, under its lock.
pub fn is_up_to_date(policy: &StipendPolicy, record: &AccountRecord, now_ms: i64) -> bool {
    let stipend_due = record.kind == AccountKind::Person
        && record.stipend_period != Some(policy.period_index(now_ms));
    !stipend_due && next_expiry_ms(&record.lots).is_none_or(|at| at > now_ms)
}

/// When the soonest of a row's lots expires, if any does: the store keeps it in a column, so
/// that "nothing is due" is a comparison in SQL.
pub fn next_expiry_ms(lots: &[Lot]) -> Option<i64> {
    lots.iter().filter_map(|lot| lot.expires_at_ms).min()
}

/// Applies what is due on a grant-holding account at `now_ms` (the stipends of the periods it
/// missed, the rollover cap, lots past their expiry), keeping what leases hold (`held_cu`) from
/// expiring, as open reservations are kept on one node. Returns the transfers to record, in order.
pub fn bring_up_to_date(
    policy: &StipendPolicy,
    record: &mut AccountRecord,
    held_cu: u64,
    issuer_id: AccountId,
    now_ms: i64,
    next_id: &mut dyn FnMut() -> TransferId,
) -> Result<Vec<Transfer>, ApplyError> {
    let mut transfers = Vec::new();
    if !record.kind.holds_grants() {
        return Ok(transfers);
    }
    let mut balance = Balance::from_record(record);
    let current = policy.period_index(now_ms);
    if record.kind == AccountKind::Person && balance.stipend_period != Some(current) {
        let stipend_cu = balance.lots.stipend_cu();
        let other_cu = balance.lots.total_cu() - stipend_cu;
        if let Some(catch_up) = policy.catch_up(
            balance.stipend_period,
            current,
            stipend_cu,
            other_cu,
            held_cu,
        ) {
            let mut stipend = Transfer {
                id: next_id(),
                kind: TransferKind::Stipend,
                debit: issuer_id,
                credit: record.id,
                amount_cu: catch_up.granted_cu,
                created_at_ms: now_ms,
                lot_expires_at_ms: Some(catch_up.lot_expires_at_ms),
                period: Some(catch_up.period),
            };
            apply(&mut issuer(), &mut balance, &stipend)?;
            transfers.push(stipend);
            if catch_up.expired_cu > 0 {
                stipend = Transfer {
                    id: next_id(),
                    kind: TransferKind::Rollover,
                    debit: record.id,
                    credit: issuer_id,
                    amount_cu: catch_up.expired_cu,
                    lot_expires_at_ms: None,
                    period: None,
                    ..stipend
                };
                apply(&mut balance, &mut issuer(), &stipend)?;
                transfers.push(stipend);
            }
        }
    }
    let expirable = balance.lots.expired_cu(now_ms);
    let unpinned = (balance.balance_cu as u64).saturating_sub(held_cu);
    let expired = expirable.min(unpinned);
    if expired > 0 {
        let expiry = Transfer {
            id: next_id(),
            kind: TransferKind::Expiry,
            debit: record.id,
            credit: issuer_id,
            amount_cu: expired,
            created_at_ms: now_ms,
            lot_expires_at_ms: None,
            period: None,
        };
        apply(&mut balance, &mut issuer(), &expiry)?;
        transfers.push(expiry);
    }
    write_back(record, balance);
    Ok(transfers)
}

/// Applies a spend (its transfer already decided: account → sink, with its period) to the
/// account's row: burns the lots that expire soonest and counts it.
pub fn spend(record: &mut AccountRecord, transfer: &Transfer) -> Result<(), ApplyError> {
    let mut balance = Balance::from_record(record);
    apply(&mut balance, &mut sink(), transfer)?;
    write_back(record, balance);
    Ok(())
}

/// Applies an operator's grant (issuer → account) to the account's row.
pub fn grant(record: &mut AccountRecord, transfer: &Transfer) -> Result<(), ApplyError> {
    let mut balance = Balance::from_record(record);
    apply(&mut issuer(), &mut balance, transfer)?;
    write_back(record, balance);
    Ok(())
}

/// Applies a gift or pool contribution between two rows.
pub fn give(
    from: &mut AccountRecord,
    to: &mut AccountRecord,
    transfer: &Transfer,
) -> Result<(), ApplyError> {
    let mut giver = Balance::from_record(from);
    let mut recipient = Balance::from_record(to);
    apply(&mut giver, &mut recipient, transfer)?;
    write_back(from, giver);
    write_back(to, recipient);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::account::LotSource;

    const DAY_MS: i64 = 86_400_000;

    fn policy() -> StipendPolicy {
        StipendPolicy::new(1_000, Duration::from_millis(DAY_MS as u64), 500).unwrap()
    }

    fn person() -> AccountRecord {
        AccountRecord {
            id: AccountId(7),
            name: "ann".to_string(),
            kind: AccountKind::Person,
            balance_cu: 0,
            lots: Vec::new(),
            stipend_period: None,
            usage: Vec::new(),
            created_at_ms: 0,
        }
    }

    fn ids() -> impl FnMut() -> TransferId {
        let mut next = 0;
        move || {
            next += 1;
            TransferId(next)
        }
    }

    #[test]
    fn a_row_is_brought_up_to_date_and_leases_pin_what_they_hold() {
        let policy = policy();
        let mut row = person();
        let now = 10 * DAY_MS + 5;
        assert!(!is_up_to_date(&policy, &row, now));
        let transfers =
            bring_up_to_date(&policy, &mut row, 0, AccountId(1), now, &mut ids()).unwrap();
        assert_eq!(transfers.len(), 1);
        assert_eq!((row.balance_cu, row.stipend_period), (1_000, Some(10)));
        assert!(is_up_to_date(&policy, &row, now));
        assert_eq!(next_expiry_ms(&row.lots), Some(11 * DAY_MS));
        // Three days later, 900 of it leased out: the rollover cap (500) would leave less than
        // the leases hold, so what they hold is kept.
        let later = 13 * DAY_MS;
        let transfers =
            bring_up_to_date(&policy, &mut row, 900, AccountId(1), later, &mut ids()).unwrap();
        let kinds: Vec<_> = transfers.iter().map(|transfer| transfer.kind).collect();
        assert_eq!(kinds, [TransferKind::Stipend, TransferKind::Rollover]);
        assert!(row.balance_cu >= 900, "{}", row.balance_cu);
        assert_eq!(row.stipend_period, Some(13));
    }

    #[test]
    fn expired_grants_go_back_except_what_leases_hold() {
        let mut row = AccountRecord {
            kind: AccountKind::Pool,
            balance_cu: 300,
            lots: vec![Lot {
                remaining_cu: 300,
                expires_at_ms: Some(50),
                source: LotSource::Grant,
            }],
            ..person()
        };
        let transfers =
            bring_up_to_date(&policy(), &mut row, 120, AccountId(1), 60, &mut ids()).unwrap();
        assert_eq!(transfers.len(), 1);
        assert_eq!(transfers[0].amount_cu, 180);
        assert_eq!(row.balance_cu, 120);
    }

    #[test]
    fn a_spend_burns_the_soonest_lot_and_is_counted() {
        let mut row = AccountRecord {
            balance_cu: 30,
            lots: vec![
                Lot {
                    remaining_cu: 10,
                    expires_at_ms: Some(5),
                    source: LotSource::Grant,
                },
                Lot {
                    remaining_cu: 20,
                    expires_at_ms: None,
                    source: LotSource::Grant,
                },
            ],
            ..person()
        };
        let transfer = Transfer {
            id: TransferId(9),
            kind: TransferKind::Spend,
            debit: row.id,
            credit: AccountId(3),
            amount_cu: 15,
            created_at_ms: 1,
            lot_expires_at_ms: None,
            period: Some(0),
        };
        spend(&mut row, &transfer).unwrap();
        assert_eq!(row.balance_cu, 15);
        assert_eq!(row.lots.len(), 1);
        assert_eq!(row.usage[0].charged_cu, 15);
        // More than the row holds is refused, and the row is left as it was.
        let before = row.clone();
        let too_much = Transfer {
            amount_cu: 16,
            ..transfer
        };
        assert!(spend(&mut row, &too_much).is_err());
        assert_eq!(row, before);
    }
}
