//! The stipend policy and the arithmetic of lots: granting, rolling over, expiring, burning.
//!
//! Everything here is pure: state in, state and transfer amounts out. The ledger applies the
//! results and records them.

use std::time::Duration;

use crate::account::{Lot, LotSource};
use crate::limits::{AMOUNT_MAX_CU, LOTS_MAX, PERIOD_MAX, PERIOD_MIN, STIPEND_MAX_CU};
use crate::units::{Flops, format_duration};

/// Why a policy is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The stipend is zero or too large.
    #[error("stipend.amount must be between 1 cu and {} ({STIPEND_MAX_CU} cu), got {amount_cu} cu", Flops(STIPEND_MAX_CU as i64))]
    Amount {
        /// The amount given.
        amount_cu: u64,
    },
    /// The period is out of range.
    #[error("stipend.period must be between 1s and 3650d, got {period}")]
    Period {
        /// The period given.
        period: String,
    },
    /// The rollover cap is too large.
    #[error(
        "stipend.rollover_max must be at most {} cu, got {rollover_max_cu} cu",
        AMOUNT_MAX_CU
    )]
    Rollover {
        /// The cap given.
        rollover_max_cu: u64,
    },
}

/// How much each person gets, how often, and how much unspent stipend carries over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StipendPolicy {
    amount_cu: u64,
    period_ms: i64,
    rollover_max_cu: u64,
}

impl StipendPolicy {
    /// Checks and builds a policy.
    pub fn new(
        amount_cu: u64,
        period: Duration,
        rollover_max_cu: u64,
    ) -> Result<StipendPolicy, PolicyError> {
        if amount_cu == 0 || amount_cu > STIPEND_MAX_CU {
            return Err(PolicyError::Amount { amount_cu });
        }
        if period < PERIOD_MIN || period > PERIOD_MAX {
            return Err(PolicyError::Period {
                period: format_duration(period),
            });
        }
        if rollover_max_cu > STIPEND_MAX_CU {
            return Err(PolicyError::Rollover { rollover_max_cu });
        }
        Ok(StipendPolicy {
            amount_cu,
            period_ms: period.as_millis() as i64,
            rollover_max_cu,
        })
    }

    /// The stipend per period, in cu.
    pub fn amount_cu(&self) -> u64 {
        self.amount_cu
    }

    /// The period.
    pub fn period(&self) -> Duration {
        Duration::from_millis(self.period_ms as u64)
    }

    /// The rollover cap, in cu.
    pub fn rollover_max_cu(&self) -> u64 {
        self.rollover_max_cu
    }

    /// The period that holds `now_ms`. Periods are aligned to multiples of their length since the
    /// UNIX epoch (UTC), so every node agrees on them without talking.
    pub fn period_index(&self, now_ms: i64) -> i64 {
        now_ms.div_euclid(self.period_ms)
    }

    /// When period `index` starts (ms since the epoch).
    pub fn period_start_ms(&self, index: i64) -> i64 {
        index.saturating_mul(self.period_ms)
    }

    /// When the next stipend arrives after `now_ms`.
    pub fn next_grant_at_ms(&self, now_ms: i64) -> i64 {
        self.period_start_ms(self.period_index(now_ms) + 1)
    }

    /// The stipend arithmetic for a person last granted in period `last` (or never), now in
    /// period `current`, holding `stipend_lot_cu` of unspent stipend, `other_cu` in other lots,
    /// and `reserved_cu` held by open reservations.
    ///
    /// Over `n` boundaries the stipend lot goes `s ← min(s, rollover_max) + amount`, whose closed
    /// form is `s_n = min(min(s_0, R) + (n − 1)·A, R) + A`. Periods so long past that their stipend
    /// could not have survived the rollover cap are not booked (they would be granted and expired
    /// in the same breath); so an account idle for years costs one grant and one expiry, not one
    /// per period, and the issuer's total stays bounded by what could actually be held.
    ///
    /// Compute held by open reservations never expires: if the capped balance would fall below
    /// `reserved_cu`, enough is kept to cover it.
    pub fn catch_up(
        &self,
        last: Option<i64>,
        current: i64,
        stipend_lot_cu: u64,
        other_cu: u64,
        reserved_cu: u64,
    ) -> Option<StipendCatchUp> {
        let periods = match last {
            None => 1,
            Some(last) if last < current => current - last,
            Some(_) => return None,
        };
        let amount = u128::from(self.amount_cu);
        let rollover = u128::from(self.rollover_max_cu);
        // Beyond this many boundaries, older stipends are certainly gone.
        let periods_that_matter = 1 + rollover.div_ceil(amount);
        let periods_booked = (periods as u128).min(periods_that_matter);
        let carried = u128::from(stipend_lot_cu).min(rollover);
        let mut lot = (carried + (periods_booked - 1) * amount).min(rollover) + amount;
        // Pin: never expire compute an open reservation holds.
        let balance_after = u128::from(other_cu) + lot;
        if balance_after < u128::from(reserved_cu) {
            lot += u128::from(reserved_cu) - balance_after;
        }
        let granted = periods_booked * amount;
        let expired = u128::from(stipend_lot_cu) + granted - lot;
        Some(StipendCatchUp {
            granted_cu: granted as u64,
            expired_cu: expired as u64,
            stipend_lot_cu: lot as u64,
            lot_expires_at_ms: self.period_start_ms(current + 1),
            period: current,
        })
    }
}

/// The outcome of [`StipendPolicy::catch_up`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StipendCatchUp {
    /// Stipend granted, issuer → person.
    pub granted_cu: u64,
    /// Stipend past the rollover cap, person → issuer.
    pub expired_cu: u64,
    /// The stipend lot afterwards.
    pub stipend_lot_cu: u64,
    /// When that lot expires: the end of the current period.
    pub lot_expires_at_ms: i64,
    /// The period now granted up to.
    pub period: i64,
}

/// The lots of one grant-holding account, kept sorted by expiry (soonest first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lots(Vec<Lot>);

impl Lots {
    /// Builds from stored lots, sorting them.
    pub fn from_vec(mut lots: Vec<Lot>) -> Lots {
        lots.sort_by_key(Lot::expiry_key);
        Lots(lots)
    }

    /// The lots, soonest expiry first.
    pub fn as_slice(&self) -> &[Lot] {
        &self.0
    }

    /// Their sum, in cu.
    pub fn total_cu(&self) -> u64 {
        self.0.iter().map(|lot| lot.remaining_cu).sum()
    }

    /// The unspent stipend.
    pub fn stipend_cu(&self) -> u64 {
        self.0
            .iter()
            .filter(|lot| lot.source == LotSource::Stipend)
            .map(|lot| lot.remaining_cu)
            .sum()
    }

    /// Whether one more lot of this expiry and source can be added.
    pub fn can_credit(&self, expires_at_ms: Option<i64>, source: LotSource) -> bool {
        self.0.len() < LOTS_MAX
            || self
                .0
                .iter()
                .any(|lot| lot.expires_at_ms == expires_at_ms && lot.source == source)
    }

    /// Adds compute, merging with a lot of the same expiry and source.
    pub fn credit(&mut self, amount_cu: u64, expires_at_ms: Option<i64>, source: LotSource) {
        if amount_cu == 0 {
            return;
        }
        if let Some(lot) = self
            .0
            .iter_mut()
            .find(|lot| lot.expires_at_ms == expires_at_ms && lot.source == source)
        {
            lot.remaining_cu += amount_cu;
            return;
        }
        let lot = Lot {
            remaining_cu: amount_cu,
            expires_at_ms,
            source,
        };
        let at = self
            .0
            .partition_point(|existing| existing.expiry_key() <= lot.expiry_key());
        self.0.insert(at, lot);
    }

    /// Replaces the stipend lot.
    pub fn set_stipend(&mut self, amount_cu: u64, expires_at_ms: i64) {
        self.0.retain(|lot| lot.source != LotSource::Stipend);
        self.credit(amount_cu, Some(expires_at_ms), LotSource::Stipend);
    }

    /// Takes `amount_cu`, soonest expiry first, and returns the slices taken (with their expiry
    /// and source) so that a gift can carry them on. The caller has checked the total.
    pub fn burn(&mut self, amount_cu: u64) -> Vec<Lot> {
        assert!(
            amount_cu <= self.total_cu(),
            "burn of {amount_cu} cu exceeds lots of {} cu",
            self.total_cu()
        );
        let mut left = amount_cu;
        let mut taken = Vec::new();
        for lot in &mut self.0 {
            if left == 0 {
                break;
            }
            let take = lot.remaining_cu.min(left);
            lot.remaining_cu -= take;
            left -= take;
            taken.push(Lot {
                remaining_cu: take,
                ..*lot
            });
        }
        self.0.retain(|lot| lot.remaining_cu > 0);
        taken
    }

    /// Removes up to `limit_cu` from non-stipend lots whose expiry is at or before `now_ms`,
    /// soonest first, and returns how much was removed. (The stipend lot expires through
    /// [`StipendPolicy::catch_up`], which applies the rollover cap.)
    pub fn expire(&mut self, now_ms: i64, limit_cu: u64) -> u64 {
        let mut left = limit_cu;
        let mut removed = 0;
        for lot in &mut self.0 {
            if left == 0 {
                break;
            }
            let expired = lot.source != LotSource::Stipend
                && lot.expires_at_ms.is_some_and(|expires| expires <= now_ms);
            if expired {
                let take = lot.remaining_cu.min(left);
                lot.remaining_cu -= take;
                left -= take;
                removed += take;
            }
        }
        self.0.retain(|lot| lot.remaining_cu > 0);
        removed
    }

    /// Whether any lot (stipend included) has reached its expiry by `now_ms`. Lots are sorted by
    /// expiry, so this reads only the first.
    pub fn any_expired(&self, now_ms: i64) -> bool {
        self.0.first().is_some_and(|lot| lot.expiry_key() <= now_ms)
    }

    /// How much in non-stipend lots has expired by `now_ms`.
    pub fn expired_cu(&self, now_ms: i64) -> u64 {
        self.0
            .iter()
            .filter(|lot| {
                lot.source != LotSource::Stipend
                    && lot.expires_at_ms.is_some_and(|expires| expires <= now_ms)
            })
            .map(|lot| lot.remaining_cu)
            .sum()
    }

    /// The lots as stored.
    pub fn to_vec(&self) -> Vec<Lot> {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn policy(amount: u64, rollover: u64) -> StipendPolicy {
        StipendPolicy::new(amount, DAY, rollover).unwrap()
    }

    /// Runs the per-period recurrence one boundary at a time, the slow obvious way.
    fn step_by_step(policy: &StipendPolicy, s0: u64, periods: i64) -> u64 {
        let mut s = s0;
        for _ in 0..periods {
            s = s.min(policy.rollover_max_cu()) + policy.amount_cu();
        }
        s
    }

    #[test]
    fn policy_bounds() {
        assert!(StipendPolicy::new(0, DAY, 0).is_err());
        assert!(StipendPolicy::new(STIPEND_MAX_CU + 1, DAY, 0).is_err());
        assert!(StipendPolicy::new(1, Duration::from_millis(999), 0).is_err());
        assert!(StipendPolicy::new(1, PERIOD_MAX + Duration::from_secs(1), 0).is_err());
        assert!(StipendPolicy::new(1, DAY, STIPEND_MAX_CU + 1).is_err());
        let message = StipendPolicy::new(0, DAY, 0).unwrap_err().to_string();
        assert!(message.contains("stipend.amount"), "{message}");
    }

    #[test]
    fn periods_align_to_the_epoch() {
        let p = policy(10, 10);
        assert_eq!(p.period_index(0), 0);
        assert_eq!(p.period_index(86_399_999), 0);
        assert_eq!(p.period_index(86_400_000), 1);
        assert_eq!(p.period_index(-1), -1);
        assert_eq!(p.next_grant_at_ms(1), 86_400_000);
        assert_eq!(p.next_grant_at_ms(86_400_000), 2 * 86_400_000);
    }

    #[test]
    fn first_touch_grants_one_period() {
        let p = policy(100, 100);
        let c = p.catch_up(None, 7, 0, 0, 0).unwrap();
        assert_eq!(c.granted_cu, 100);
        assert_eq!(c.expired_cu, 0);
        assert_eq!(c.stipend_lot_cu, 100);
        assert_eq!(c.lot_expires_at_ms, 8 * 86_400_000);
        assert_eq!(p.catch_up(Some(7), 7, 100, 0, 0), None);
    }

    #[test]
    fn closed_form_matches_the_recurrence_across_many_periods() {
        for (amount, rollover) in [(100, 100), (100, 0), (100, 250), (7, 1_000), (1_000, 1)] {
            let p = policy(amount, rollover);
            for s0 in [0, 1, 50, 99, 100, 101, 249, 250, 251, 5_000] {
                for periods in [1i64, 2, 3, 4, 5, 10, 100, 1_000_000] {
                    let c = p.catch_up(Some(0), periods, s0, 0, 0).unwrap();
                    let expected = step_by_step(&p, s0, periods.min(200));
                    assert_eq!(
                        c.stipend_lot_cu, expected,
                        "A={amount} R={rollover} s0={s0} n={periods}"
                    );
                    // Conservation: what was there plus what was granted is what is left plus
                    // what expired.
                    assert_eq!(s0 + c.granted_cu, c.stipend_lot_cu + c.expired_cu);
                }
            }
        }
    }

    #[test]
    fn idle_years_book_a_bounded_grant() {
        let p = policy(100, 100);
        let c = p.catch_up(Some(0), 3_650, 0, 0, 0).unwrap();
        assert_eq!(c.stipend_lot_cu, 200);
        assert_eq!(
            c.granted_cu, 200,
            "only the periods that can still be held are booked"
        );
        assert_eq!(c.expired_cu, 0);
    }

    #[test]
    fn reservations_pin_compute_against_expiry() {
        // 500 unspent, rollover cap 100: normally 400 expires, but 450 is reserved.
        let p = policy(100, 100);
        let c = p.catch_up(Some(0), 1, 500, 0, 450).unwrap();
        assert_eq!(c.stipend_lot_cu, 450);
        assert_eq!(c.expired_cu, 150);
        assert_eq!(500 + c.granted_cu, c.stipend_lot_cu + c.expired_cu);
    }

    #[test]
    fn burn_takes_the_soonest_expiry_first() {
        let mut lots = Lots::default();
        lots.credit(30, None, LotSource::Grant);
        lots.credit(20, Some(2_000), LotSource::Gift);
        lots.set_stipend(50, 1_000);
        assert_eq!(lots.total_cu(), 100);
        let taken = lots.burn(60);
        assert_eq!(taken.len(), 2);
        assert_eq!(
            (taken[0].remaining_cu, taken[0].source),
            (50, LotSource::Stipend)
        );
        assert_eq!(
            (taken[1].remaining_cu, taken[1].source),
            (10, LotSource::Gift)
        );
        assert_eq!(lots.total_cu(), 40);
        assert_eq!(lots.as_slice()[0].expires_at_ms, Some(2_000));
        assert_eq!(lots.as_slice()[1].expires_at_ms, None);
    }

    #[test]
    fn credit_merges_same_expiry_and_source() {
        let mut lots = Lots::default();
        lots.credit(5, Some(10), LotSource::Gift);
        lots.credit(7, Some(10), LotSource::Gift);
        lots.credit(1, Some(10), LotSource::Grant);
        assert_eq!(lots.as_slice().len(), 2);
        assert_eq!(lots.total_cu(), 13);
    }

    #[test]
    fn expire_respects_its_limit_and_skips_the_stipend() {
        let mut lots = Lots::default();
        lots.set_stipend(100, 500);
        lots.credit(40, Some(400), LotSource::Gift);
        lots.credit(60, Some(450), LotSource::Grant);
        lots.credit(10, Some(9_999), LotSource::Grant);
        assert_eq!(lots.expired_cu(1_000), 100);
        assert_eq!(lots.expire(1_000, 70), 70);
        assert_eq!(lots.total_cu(), 140);
        assert_eq!(lots.stipend_cu(), 100);
        assert_eq!(lots.expire(1_000, u64::MAX), 30);
        assert_eq!(lots.total_cu(), 110);
    }

    #[test]
    fn lot_count_is_capped() {
        let mut lots = Lots::default();
        for expiry in 0..LOTS_MAX as i64 {
            assert!(lots.can_credit(Some(expiry), LotSource::Grant));
            lots.credit(1, Some(expiry), LotSource::Grant);
        }
        assert!(!lots.can_credit(Some(-1), LotSource::Grant));
        assert!(
            lots.can_credit(Some(0), LotSource::Grant),
            "merging is always possible"
        );
    }
}
