//! `ledger verify`: every invariant, checked over the whole store from one consistent snapshot.

use std::collections::HashMap;

use crate::account::{AccountId, AccountKind};
use crate::state::{Balance, apply};
use crate::store::{Store, StoreError};
use crate::transfer::Transfer;

/// What the audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// How many accounts were checked.
    pub n_accounts: u64,
    /// How many transfers were checked.
    pub n_transfers: u64,
    /// How many of them came after the last checkpoint and were replayed.
    pub n_replayed: u64,
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

/// Checks every stored invariant, from one consistent snapshot of the store:
/// - each account row (a checkpoint) equals what the transfer log up to the checkpoint says;
/// - the log after the checkpoint replays cleanly through [`apply`] onto those rows;
/// - on the result: all balances sum to zero (double entry); no person, pool or agent balance is
///   negative, each equals the sum of its lots, which are positive, with at most one stipend lot;
///   there is exactly one issuer, never positive; sinks are never negative; names are unique;
/// - every transfer moves a positive amount between two distinct, existing accounts.
pub fn verify(store: &dyn Store) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let mut states: HashMap<AccountId, (String, Balance)> = HashMap::new();
    let mut names: HashMap<String, u64> = HashMap::new();
    let mut violations = Vec::new();
    let mut tail: Vec<Transfer> = Vec::new();
    let transfers = store.audit(
        &mut |row| {
            let account = &row.account;
            let net = row.credits_cu - row.debits_cu;
            if net != i128::from(account.balance_cu) {
                violations.push(format!(
                    "account {} ({}): balance {} cu at the checkpoint, but the log up to it nets to {net} cu",
                    account.id, account.name, account.balance_cu
                ));
            }
            *names.entry(account.name.clone()).or_default() += 1;
            states.insert(
                account.id,
                (account.name.clone(), Balance::from_record(account)),
            );
        },
        &mut |transfer| tail.push(transfer),
    )?;
    report.violations = violations;
    for transfer in &tail {
        if transfer.debit == transfer.credit {
            continue; // counted among the transfer facts below
        }
        // A transfer naming an unknown account is counted among the transfer facts below.
        if let [Some((_, debit)), Some((_, credit))] =
            states.get_disjoint_mut([&transfer.debit, &transfer.credit])
            && let Err(error) = apply(debit, credit, transfer)
        {
            report
                .violations
                .push(format!("replaying the log: {error}"));
        }
    }
    let mut issuers = 0u64;
    let mut ids: Vec<&AccountId> = states.keys().collect();
    ids.sort();
    for id in ids {
        let (name, balance) = &states[id];
        report.n_accounts += 1;
        report.balance_sum_cu += i128::from(balance.balance_cu);
        if balance.kind == AccountKind::Issuer {
            issuers += 1;
        }
        if let Err(violation) = balance.check(*id) {
            report.violations.push(format!("{violation} ({name})"));
        }
    }
    report.n_transfers = transfers.n_transfers;
    report.n_replayed = tail.len() as u64;
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
