//! What the operator's page and the admin API both do, on the books: one function each, so the
//! two cannot drift apart. Each may wait on the disk or the database: call it on a blocking
//! thread.

use stipend_ledger::{AccountId, AccountKind, AccountView, Books, LedgerError, Posted, TransferId};
use stipend_report::Distribution;

use crate::limits::PEOPLE_SCANNED_PAGE;
use stipend_ledger::limits::DAY_MS;

/// People and pools after the account id `after`, in id order, scanning at most `limit`
/// accounts; with the id to ask from next when there may be more.
pub fn accounts(
    books: &dyn Books,
    after: Option<u64>,
    limit: usize,
) -> Result<(Vec<AccountView>, Option<u64>), LedgerError> {
    let views = books.views(after.map(AccountId), limit)?;
    let next_after = (views.len() == limit)
        .then(|| views.last().map(|view| view.id.0))
        .flatten();
    let shown = views
        .into_iter()
        .filter(|view| matches!(view.kind, AccountKind::Person | AccountKind::Pool))
        .collect();
    Ok((shown, next_after))
}

/// Writes what an operator (`actor`) did to the operator log; a log that cannot be written is
/// said, and the change it describes stands.
pub fn record(
    books: &dyn Books,
    actor: &str,
    action: &str,
    account: Option<AccountId>,
    object: Option<String>,
    amount_cu: Option<u64>,
) {
    let entry = stipend_ledger::OperatorAction {
        at_ms: books.now_ms(),
        actor: actor.to_string(),
        action: action.to_string(),
        account,
        object,
        amount_cu,
    };
    if let Err(error) = books.store().record_action(&entry) {
        tracing::warn!(%error, action, "cannot write the operator log");
    }
}

/// Creates a person or a pool for the operator `actor`; returns it as it now is.
pub fn create_account(
    books: &dyn Books,
    actor: &str,
    name: &str,
    kind: AccountKind,
) -> Result<AccountView, LedgerError> {
    let id = books.create_account(name.trim(), kind)?;
    let view = books.view(id)?;
    tracing::info!(account = %id, "account created by the operator");
    record(books, actor, "account create", Some(id), None, None);
    Ok(view)
}

/// Grants compute from the issuer to the account named `name` (idempotent by `id`); returns
/// its name as stored and the transfer.
pub fn grant(
    books: &dyn Books,
    actor: &str,
    name: &str,
    amount_cu: u64,
    id: TransferId,
    expires_at_ms: Option<i64>,
) -> Result<(String, Posted), LedgerError> {
    let to = books.account_id(name.trim())?;
    let posted = books.grant(id, to, amount_cu, expires_at_ms)?;
    tracing::info!(account = %to, transfer = %id, replayed = posted.replayed, "grant by the operator");
    if !posted.replayed {
        record(books, actor, "grant", Some(to), None, Some(amount_cu));
    }
    Ok((books.view(to)?.name, posted))
}

/// This period's distribution of compute used, over every person (whether they used any or
/// not), read a page of accounts at a time.
pub fn distribution(books: &dyn Books) -> Result<Distribution, LedgerError> {
    Ok(survey(books, &[])?.distribution)
}

/// What one pass over every account tells the operator.
pub struct Survey {
    /// This period's distribution of compute used across people.
    pub distribution: Distribution,
    /// Earlier periods' (newest first, as far back as usage is kept by day), when periods are
    /// whole UTC days, so that each day's count belongs to one period. Everyone with an account
    /// now is counted in each.
    pub earlier: Vec<(i64, Distribution)>,
    /// Compute each of `sinks` was charged per UTC day over the days kept, oldest first: what
    /// each model served.
    pub served_by_day: Vec<(i64, Vec<u64>)>,
}

/// Visits every account, a page of [`PEOPLE_SCANNED_PAGE`] at a time, in id order.
pub fn for_each_view(
    books: &dyn Books,
    mut visit: impl FnMut(&AccountView),
) -> Result<(), LedgerError> {
    let mut after = None;
    loop {
        let views = books.views(after, PEOPLE_SCANNED_PAGE)?;
        let Some(last) = views.last() else {
            return Ok(());
        };
        after = Some(last.id);
        views.iter().for_each(&mut visit);
        if views.len() < PEOPLE_SCANNED_PAGE {
            return Ok(());
        }
    }
}

/// How many earlier periods the operator's page shows.
pub const EARLIER_PERIODS_SHOWN: usize = 3;

/// One pass over every account (a page at a time): this period's distribution across people,
/// the earlier periods' where the days kept allow, and what each of `sinks` served per day.
pub fn survey(books: &dyn Books, sinks: &[AccountId]) -> Result<Survey, LedgerError> {
    let policy = books.policy();
    let now_ms = books.now_ms();
    let period_now = policy.period_index(now_ms);
    let period_ms = policy.period().as_millis() as i64;
    let whole_days = period_ms % DAY_MS == 0;
    let first_day = stipend_ledger::first_day_kept(now_ms);
    let today = now_ms.div_euclid(DAY_MS);
    // The earlier periods whose every day is still kept.
    let earlier_periods: Vec<i64> = if whole_days {
        (1..=EARLIER_PERIODS_SHOWN as i64)
            .map(|back| period_now - back)
            .filter(|period| (period * period_ms).div_euclid(DAY_MS) >= first_day)
            .collect()
    } else {
        Vec::new()
    };
    let mut used_now = Vec::new();
    let mut used_earlier: Vec<Vec<u64>> = vec![Vec::new(); earlier_periods.len()];
    let mut served: Vec<Vec<u64>> = vec![vec![0; sinks.len()]; (today - first_day + 1) as usize];
    for_each_view(books, |view| {
        for usage in &view.daily {
            if let (Some(sink), Ok(day)) = (
                sinks.iter().position(|sink| *sink == usage.sink),
                usize::try_from(usage.day - first_day),
            ) && let Some(row) = served.get_mut(day)
            {
                row[sink] += usage.charged_cu;
            }
        }
        if view.kind != AccountKind::Person {
            return;
        }
        used_now.push(view.usage.iter().map(|usage| usage.charged_cu).sum::<u64>());
        for (index, period) in earlier_periods.iter().enumerate() {
            used_earlier[index].push(
                view.daily
                    .iter()
                    .filter(|usage| (usage.day * DAY_MS).div_euclid(period_ms) == *period)
                    .map(|usage| usage.charged_cu)
                    .sum(),
            );
        }
    })?;
    Ok(Survey {
        distribution: Distribution::of(used_now),
        earlier: earlier_periods
            .into_iter()
            .zip(used_earlier)
            .map(|(period, used)| (period, Distribution::of(used)))
            .collect(),
        served_by_day: served
            .into_iter()
            .enumerate()
            .map(|(index, row)| (first_day + index as i64, row))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;
    use stipend_ledger::{Ledger, LedgerOptions, ManualClock, StipendPolicy, Store};

    /// Day 20 000 at noon.
    const T0: i64 = 20_000 * DAY_MS + DAY_MS / 2;

    fn spend(ledger: &Ledger, account: AccountId, sink: AccountId, cu: u64) {
        let reservation = ledger
            .reserve(account, sink, cu, Duration::from_secs(60))
            .unwrap();
        ledger.settle(reservation.id(), cu).unwrap().wait().unwrap();
    }

    #[test]
    fn a_survey_sees_this_period_the_earlier_ones_and_each_day_served() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            stipend_store_sqlite::SqliteStore::open(&dir.path().join("ledger.db")).unwrap(),
        );
        let clock = Arc::new(ManualClock::new(T0));
        // A period a day.
        let policy = StipendPolicy::new(1_000_000, Duration::from_secs(86_400), 0).unwrap();
        let ledger = Ledger::open(store, clock.clone(), LedgerOptions::new(policy)).unwrap();
        let sink = ledger.sink("sink:m").unwrap();
        let other = ledger.sink("sink:n").unwrap();
        let people: Vec<AccountId> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                ledger
                    .create_account(name, AccountKind::Person)
                    .unwrap()
                    .wait()
                    .unwrap()
            })
            .collect();
        // Yesterday: a used 100, b 300, c nothing; at two models.
        spend(&ledger, people[0], sink, 100);
        spend(&ledger, people[1], other, 300);
        clock.advance_ms(DAY_MS);
        // Today: c alone used 50.
        spend(&ledger, people[2], sink, 50);
        let survey = survey(&ledger, &[sink, other]).unwrap();
        assert_eq!(survey.distribution.used_cu, 50);
        assert_eq!(survey.distribution.people, 3);
        assert_eq!(survey.distribution.people_active, 1);
        let (period, yesterday) = &survey.earlier[0];
        assert_eq!(*period, 20_000);
        assert_eq!((yesterday.used_cu, yesterday.people_active), (400, 2));
        assert!((yesterday.gini - Distribution::of(vec![100, 300, 0]).gini).abs() < 1e-12);
        // Two days before had nothing (a period with nobody's use), and is shown as such.
        assert_eq!(survey.earlier[1].1.used_cu, 0);
        // Served per day: the last column is today, the one before yesterday.
        let days = &survey.served_by_day;
        assert_eq!(days.len() as i64, stipend_ledger::limits::USAGE_DAYS_KEPT);
        assert_eq!(days[days.len() - 1], (20_001, vec![50, 0]));
        assert_eq!(days[days.len() - 2], (20_000, vec![100, 300]));
        assert!(
            days[..days.len() - 2]
                .iter()
                .all(|(_, parts)| parts == &[0, 0])
        );
    }
}
