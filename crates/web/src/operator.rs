//! What the operator's page and the admin API both do, on the books: one function each, so the
//! two cannot drift apart. Each may wait on the disk or the database: call it on a blocking
//! thread.

use stipend_ledger::{AccountId, AccountKind, AccountView, Books, LedgerError, Posted, TransferId};
use stipend_report::Distribution;

use crate::limits::PEOPLE_SCANNED_PAGE;

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

/// Creates a person or a pool; returns it as it now is.
pub fn create_account(
    books: &dyn Books,
    name: &str,
    kind: AccountKind,
) -> Result<AccountView, LedgerError> {
    let id = books.create_account(name.trim(), kind)?;
    let view = books.view(id)?;
    tracing::info!(account = %id, "account created by the operator");
    Ok(view)
}

/// Grants compute from the issuer to the account named `name` (idempotent by `id`); returns
/// its name as stored and the transfer.
pub fn grant(
    books: &dyn Books,
    name: &str,
    amount_cu: u64,
    id: TransferId,
    expires_at_ms: Option<i64>,
) -> Result<(String, Posted), LedgerError> {
    let to = books.account_id(name.trim())?;
    let posted = books.grant(id, to, amount_cu, expires_at_ms)?;
    tracing::info!(account = %to, transfer = %id, replayed = posted.replayed, "grant by the operator");
    Ok((books.view(to)?.name, posted))
}

/// This period's distribution of compute used, over every person (whether they used any or
/// not), read a page of accounts at a time.
pub fn distribution(books: &dyn Books) -> Result<Distribution, LedgerError> {
    let mut used = Vec::new();
    let mut after = None;
    loop {
        let views = books.views(after, PEOPLE_SCANNED_PAGE)?;
        let Some(last) = views.last() else { break };
        after = Some(last.id);
        for view in &views {
            if view.kind == AccountKind::Person {
                used.push(view.usage.iter().map(|usage| usage.charged_cu).sum::<u64>());
            }
        }
        if views.len() < PEOPLE_SCANNED_PAGE {
            break;
        }
    }
    Ok(Distribution::of(used))
}
