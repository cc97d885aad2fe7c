//! `ledger verify`: every invariant, checked over the whole store from one consistent snapshot.

use std::collections::HashMap;

use crate::account::{AccountKind, LotSource};
use crate::store::{Store, StoreError};

/// What the audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// How many accounts were checked.
    pub n_accounts: u64,
    /// How many transfers were checked.
    pub n_transfers: u64,
    /// The sum of all balances (zero when double entry holds).
    pub balance_sum_cu: i128,
    /// Every violation found, one sentence each. Empty when all invariants hold.
    pub violations: Vec<String>,
}

impl VerifyReport {
    /// Whether every invariant holds.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Checks every stored invariant:
/// - double entry: all balances sum to zero, and each balance equals its credits minus debits;
/// - no person, pool or agent balance is negative, and each equals the sum of its lots, which
///   are all positive, with at most one stipend lot;
/// - there is exactly one issuer, never positive; sinks are never negative;
/// - every transfer moves a positive amount between two distinct, existing accounts.
pub fn verify(store: &dyn Store) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let mut issuers = 0u64;
    let mut names: HashMap<String, u64> = HashMap::new();
    let transfers = store.audit(&mut |row| {
        let account = &row.account;
        let id = account.id;
        report.n_accounts += 1;
        report.balance_sum_cu += i128::from(account.balance_cu);
        *names.entry(account.name.clone()).or_default() += 1;
        let net = row.credits_cu - row.debits_cu;
        if net != i128::from(account.balance_cu) {
            report.violations.push(format!(
                "account {id} ({}): balance {} cu but its transfers net to {net} cu",
                account.name, account.balance_cu
            ));
        }
        match account.kind {
            AccountKind::Issuer => {
                issuers += 1;
                if account.balance_cu > 0 {
                    report.violations.push(format!(
                        "issuer {id}: positive balance {}",
                        account.balance_cu
                    ));
                }
            }
            AccountKind::Sink => {
                if account.balance_cu < 0 {
                    report.violations.push(format!(
                        "sink {id} ({}): negative balance {}",
                        account.name, account.balance_cu
                    ));
                }
            }
            AccountKind::Person | AccountKind::Pool | AccountKind::Agent => {
                if account.balance_cu < 0 {
                    report.violations.push(format!(
                        "account {id} ({}): negative balance {}",
                        account.name, account.balance_cu
                    ));
                }
                let lots_cu: i128 = account
                    .lots
                    .iter()
                    .map(|lot| i128::from(lot.remaining_cu))
                    .sum();
                if lots_cu != i128::from(account.balance_cu) {
                    report.violations.push(format!(
                        "account {id} ({}): lots sum to {lots_cu} cu but the balance is {} cu",
                        account.name, account.balance_cu
                    ));
                }
                if account.lots.iter().any(|lot| lot.remaining_cu == 0) {
                    report
                        .violations
                        .push(format!("account {id} ({}): an empty lot", account.name));
                }
                let stipend_lots = account
                    .lots
                    .iter()
                    .filter(|lot| lot.source == LotSource::Stipend)
                    .count();
                if stipend_lots > 1 {
                    report.violations.push(format!(
                        "account {id} ({}): {stipend_lots} stipend lots",
                        account.name
                    ));
                }
            }
        }
        if !account.kind.holds_grants() && !account.lots.is_empty() {
            report.violations.push(format!(
                "account {id} ({}): a {} account holds lots",
                account.name, account.kind
            ));
        }
    })?;
    report.n_transfers = transfers.n_transfers;
    if report.balance_sum_cu != 0 {
        report.violations.push(format!(
            "double entry broken: balances sum to {} cu, not 0",
            report.balance_sum_cu
        ));
    }
    if report.n_accounts > 0 && issuers != 1 {
        report
            .violations
            .push(format!("{issuers} issuer accounts, expected exactly 1"));
    }
    for (name, count) in names {
        if count > 1 {
            report
                .violations
                .push(format!("{count} accounts share the name {name:?}"));
        }
    }
    for (count, what) in [
        (
            transfers.n_amount_not_positive,
            "move a non-positive amount",
        ),
        (transfers.n_self, "move compute from an account to itself"),
        (
            transfers.n_unknown_account,
            "name an account that does not exist",
        ),
    ] {
        if count > 0 {
            report.violations.push(format!("{count} transfers {what}"));
        }
    }
    Ok(report)
}
