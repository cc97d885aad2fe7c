//! Account balances and the one function that changes them: [`apply`].
//!
//! Every change to a balance is a transfer, and every transfer's effect on its two accounts
//! (balances and lots) is a deterministic function of the transfer and the accounts' state
//! before it. The live ledger changes state only through [`apply`], and recovery and
//! `ledger verify` replay the transfer log through the same function, so what was decided live
//! and what is rebuilt from the log cannot differ.

use crate::account::{AccountId, AccountKind, AccountRecord, Lot, LotSource, Usage};
use crate::limits::{DAY_MS, USAGE_DAYS_KEPT, USAGE_ENTRIES_MAX};
use crate::policy::Lots;
use crate::transfer::{Transfer, TransferKind};

/// A transfer that cannot apply to the accounts it names. In the live ledger this is a bug; in
/// a stored log it is corruption.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transfer {transfer} ({kind}) cannot apply: {reason}")]
pub struct ApplyError {
    /// The transfer.
    pub transfer: String,
    /// Its kind.
    pub kind: &'static str,
    /// Why.
    pub reason: String,
}

/// One account's balance state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// The account's kind.
    pub kind: AccountKind,
    /// Its balance, in cu.
    pub balance_cu: i64,
    /// Its lots (empty for the issuer and sinks).
    pub lots: Lots,
    /// The last period whose stipend is applied.
    pub stipend_period: Option<i64>,
    /// What it spent in its latest period, per sink.
    pub usage: Vec<Usage>,
}

impl Balance {
    /// The state a stored record describes.
    pub fn from_record(record: &AccountRecord) -> Balance {
        Balance {
            kind: record.kind,
            balance_cu: record.balance_cu,
            lots: Lots::from_vec(record.lots.clone()),
            stipend_period: record.stipend_period,
            usage: record.usage.clone(),
        }
    }

    /// Counts one spend at `sink` in `period` on `day`. Counts of earlier periods are kept for
    /// [`USAGE_DAYS_KEPT`] days (the last period's whole, for its transparency report), and at
    /// most [`USAGE_ENTRIES_MAX`] in all: past it the oldest days' go first, never this period's.
    fn count_spend(&mut self, sink: AccountId, period: i64, day: i64, amount_cu: u64) {
        let first_day = day - (USAGE_DAYS_KEPT - 1);
        self.usage
            .retain(|usage| usage.period >= period - 1 || usage.day >= first_day);
        match self
            .usage
            .iter_mut()
            .find(|usage| usage.sink == sink && usage.period == period && usage.day == day)
        {
            Some(usage) => {
                usage.requests += 1;
                usage.charged_cu += amount_cu;
            }
            None => self.usage.push(Usage {
                sink,
                period,
                day,
                requests: 1,
                charged_cu: amount_cu,
            }),
        }
        if self.usage.len() > USAGE_ENTRIES_MAX {
            // This period's counts last (they are never dropped), then by day.
            self.usage
                .sort_by_key(|usage| (usage.period >= period, usage.day, usage.period));
            let excess = self.usage.len() - USAGE_ENTRIES_MAX;
            let droppable = self
                .usage
                .iter()
                .take_while(|usage| usage.period < period)
                .count();
            self.usage.drain(..excess.min(droppable));
        }
    }

    /// Checks the per-account invariants; returns what is wrong.
    pub fn check(&self, id: AccountId) -> Result<(), String> {
        match self.kind {
            AccountKind::Person | AccountKind::Pool | AccountKind::Agent => {
                if self.balance_cu < 0 {
                    return Err(format!(
                        "account {id}: negative balance {}",
                        self.balance_cu
                    ));
                }
                let lots_cu = i128::from(self.lots.total_cu());
                if lots_cu != i128::from(self.balance_cu) {
                    return Err(format!(
                        "account {id}: lots sum to {lots_cu} cu but the balance is {} cu",
                        self.balance_cu
                    ));
                }
                if self.lots.as_slice().iter().any(|lot| lot.remaining_cu == 0) {
                    return Err(format!("account {id}: an empty lot"));
                }
                let stipend_lots = self
                    .lots
                    .as_slice()
                    .iter()
                    .filter(|lot| lot.source == LotSource::Stipend)
                    .count();
                if stipend_lots > 1 {
                    return Err(format!("account {id}: {stipend_lots} stipend lots"));
                }
            }
            AccountKind::Issuer => {
                if self.balance_cu > 0 {
                    return Err(format!("issuer {id}: positive balance {}", self.balance_cu));
                }
            }
            AccountKind::Sink => {
                if self.balance_cu < 0 {
                    return Err(format!("sink {id}: negative balance {}", self.balance_cu));
                }
            }
            AccountKind::Closed => {
                if self.balance_cu != 0 {
                    return Err(format!(
                        "closed account {id}: a balance of {} cu",
                        self.balance_cu
                    ));
                }
            }
        }
        if !self.kind.holds_grants() && !self.lots.as_slice().is_empty() {
            return Err(format!("account {id}: a {} account holds lots", self.kind));
        }
        Ok(())
    }
}

/// Which kinds may stand on each side of each kind of transfer.
fn kinds_allowed(kind: TransferKind, debit: AccountKind, credit: AccountKind) -> bool {
    use AccountKind::{Agent, Issuer, Person, Pool, Sink};
    match kind {
        TransferKind::Stipend => debit == Issuer && credit == Person,
        TransferKind::Rollover => debit == Person && credit == Issuer,
        TransferKind::Grant => debit == Issuer && credit.holds_grants(),
        TransferKind::Expiry => debit.holds_grants() && credit == Issuer,
        TransferKind::Spend => debit.holds_grants() && credit == Sink,
        TransferKind::Gift => {
            matches!(debit, Person | Pool | Agent) && matches!(credit, Person | Agent)
        }
        TransferKind::PoolContribution => matches!(debit, Person | Pool | Agent) && credit == Pool,
        TransferKind::Closure => matches!(debit, Person | Pool) && credit == Issuer,
    }
}

/// Applies one transfer to its two accounts. On error, the accounts may be partly changed; the
/// live ledger checks everything that can fail before it applies, so an error there is a bug.
pub fn apply(
    debit: &mut Balance,
    credit: &mut Balance,
    transfer: &Transfer,
) -> Result<(), ApplyError> {
    let fail = |reason: String| ApplyError {
        transfer: transfer.id.to_string(),
        kind: transfer.kind.as_str(),
        reason,
    };
    let amount = transfer.amount_cu;
    // A closure takes whatever is left, which may be nothing; every other transfer moves some.
    let empty_allowed = transfer.kind == TransferKind::Closure;
    if (amount == 0 && !empty_allowed) || amount > i64::MAX as u64 {
        return Err(fail(format!("amount {amount} cu is out of range")));
    }
    if !kinds_allowed(transfer.kind, debit.kind, credit.kind) {
        return Err(fail(format!(
            "a {} transfer cannot go from a {} account to a {} account",
            transfer.kind.as_str(),
            debit.kind,
            credit.kind
        )));
    }
    // The debit side: which lots the compute leaves.
    let mut slices: Vec<Lot> = Vec::new();
    if debit.kind.holds_grants() {
        match transfer.kind {
            TransferKind::Rollover => {
                let stipend = debit.lots.stipend_cu();
                if stipend < amount {
                    return Err(fail(format!("only {stipend} cu of stipend to roll over")));
                }
                let expires = debit
                    .lots
                    .as_slice()
                    .iter()
                    .find(|lot| lot.source == LotSource::Stipend)
                    .and_then(|lot| lot.expires_at_ms)
                    .unwrap_or(i64::MAX);
                debit.lots.set_stipend(stipend - amount, expires);
            }
            TransferKind::Expiry => {
                let expired = debit.lots.expire(transfer.created_at_ms, amount);
                if expired != amount {
                    return Err(fail(format!("only {expired} cu had expired")));
                }
            }
            TransferKind::Closure => {
                let total = debit.lots.total_cu();
                if total != amount {
                    return Err(fail(format!(
                        "a closure takes the whole balance, {total} cu, not {amount} cu"
                    )));
                }
                debit.lots.burn(amount);
                debit.kind = AccountKind::Closed;
            }
            _ => {
                let total = debit.lots.total_cu();
                if total < amount {
                    return Err(fail(format!("the lots hold only {total} cu")));
                }
                slices = debit.lots.burn(amount);
            }
        }
    }
    debit.balance_cu = debit
        .balance_cu
        .checked_sub(amount as i64)
        .ok_or_else(|| fail("the debit balance overflows".to_string()))?;
    if transfer.kind == TransferKind::Spend
        && let Some(period) = transfer.period
    {
        debit.count_spend(
            transfer.credit,
            period,
            transfer.created_at_ms.div_euclid(DAY_MS),
            amount,
        );
    }
    // The credit side: which lots the compute joins.
    if credit.kind.holds_grants() {
        match transfer.kind {
            TransferKind::Stipend => {
                let expires = transfer
                    .lot_expires_at_ms
                    .ok_or_else(|| fail("a stipend without an expiry".to_string()))?;
                let period = transfer
                    .period
                    .ok_or_else(|| fail("a stipend without a period".to_string()))?;
                let stipend = credit.lots.stipend_cu();
                credit.lots.set_stipend(stipend + amount, expires);
                credit.stipend_period = Some(period);
            }
            TransferKind::Grant => {
                if !credit
                    .lots
                    .can_credit(transfer.lot_expires_at_ms, LotSource::Grant)
                {
                    return Err(fail("the account holds too many lots".to_string()));
                }
                credit
                    .lots
                    .credit(amount, transfer.lot_expires_at_ms, LotSource::Grant);
            }
            _ => {
                for slice in &slices {
                    if !credit.lots.can_credit(slice.expires_at_ms, LotSource::Gift) {
                        return Err(fail("the account holds too many lots".to_string()));
                    }
                    credit
                        .lots
                        .credit(slice.remaining_cu, slice.expires_at_ms, LotSource::Gift);
                }
            }
        }
    }
    credit.balance_cu = credit
        .balance_cu
        .checked_add(amount as i64)
        .ok_or_else(|| fail("the credit balance overflows".to_string()))?;
    Ok(())
}

/// Whether `credit` could take the slices a gift of `amount_cu` from `debit` would carry.
pub fn can_receive_gift(debit: &Balance, credit: &Balance, amount_cu: u64) -> bool {
    let mut giver = debit.lots.clone();
    if giver.total_cu() < amount_cu {
        return false;
    }
    let mut recipient = credit.lots.clone();
    for slice in giver.burn(amount_cu) {
        if !recipient.can_credit(slice.expires_at_ms, LotSource::Gift) {
            return false;
        }
        recipient.credit(slice.remaining_cu, slice.expires_at_ms, LotSource::Gift);
    }
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::account::{usage_by_day, usage_in_period};

    fn person() -> Balance {
        Balance {
            kind: AccountKind::Person,
            balance_cu: 0,
            lots: Lots::from_vec(Vec::new()),
            stipend_period: None,
            usage: Vec::new(),
        }
    }

    #[test]
    fn a_month_of_daily_periods_keeps_the_last_31_days() {
        let mut balance = person();
        let sink = AccountId(9);
        for day in 100..140 {
            // Two spends a day, one period a day.
            balance.count_spend(sink, day, day, 10);
            balance.count_spend(sink, day, day, 5);
        }
        let days = usage_by_day(&balance.usage, 0);
        assert_eq!(days.len(), USAGE_DAYS_KEPT as usize);
        assert_eq!(days.first().unwrap().day, 140 - USAGE_DAYS_KEPT);
        assert!(
            days.iter()
                .all(|day| day.requests == 2 && day.charged_cu == 15)
        );
        assert_eq!(
            usage_in_period(&balance.usage, 139),
            vec![Usage {
                sink,
                period: 139,
                day: 139,
                requests: 2,
                charged_cu: 15
            }]
        );
        assert!(usage_in_period(&balance.usage, 140).is_empty());
    }

    #[test]
    fn a_long_period_sums_its_days_and_keeps_them_all() {
        let mut balance = person();
        let (a, b) = (AccountId(1), AccountId(2));
        // One period of 60 days: every day of it is kept, whatever its age.
        for day in 0..60 {
            balance.count_spend(a, 7, day, 1);
        }
        balance.count_spend(b, 7, 59, 100);
        let this_period = usage_in_period(&balance.usage, 7);
        assert_eq!(this_period.len(), 2);
        let a_sum = this_period.iter().find(|usage| usage.sink == a).unwrap();
        assert_eq!((a_sum.requests, a_sum.charged_cu, a_sum.day), (60, 60, 59));
        // The chart shows the last days only.
        let days = usage_by_day(&balance.usage, 59 - (USAGE_DAYS_KEPT - 1));
        assert_eq!(days.iter().filter(|day| day.sink == a).count(), 31);
    }

    #[test]
    fn counts_stay_bounded_and_this_periods_are_never_dropped() {
        let mut balance = person();
        // Hourly periods on 31 days for 8 models: far more counts than are kept.
        for hour in 0..(31 * 24) {
            for model in 0..8 {
                balance.count_spend(AccountId(model), hour, hour / 24, 1);
            }
            assert!(balance.usage.len() <= USAGE_ENTRIES_MAX);
        }
        let now = 31 * 24 - 1;
        assert_eq!(usage_in_period(&balance.usage, now).len(), 8);
        // The oldest went first.
        let oldest = balance
            .usage
            .iter()
            .map(|usage| usage.period)
            .min()
            .unwrap();
        assert_eq!(oldest, now + 1 - (USAGE_ENTRIES_MAX / 8) as i64);
    }
}
