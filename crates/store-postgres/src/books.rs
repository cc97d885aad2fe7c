//! The books of a database shared by escrow nodes: the operator's commands (accounts, grants,
//! gifts, listings) as the database's own transactions, each under the locks of the rows it
//! changes, so they run from any machine with or without nodes running. Every change goes
//! through `stipend_ledger::escrow`, and so through the ledger's one `state::apply`.

use std::sync::Arc;

use stipend_ledger::escrow::{bring_up_to_date, give, grant};
use stipend_ledger::limits::AMOUNT_MAX_CU;
use stipend_ledger::{
    AccountId, AccountKind, AccountRecord, AccountView, Books, Clock, ISSUER_NAME, LedgerError,
    Posted, StipendPolicy, Store, StoreError, Transfer, TransferId, TransferKind,
    account_name_skeleton, check_name_reserved, normalize_account_name,
};
use tokio_postgres::GenericClient;

use super::escrow::{append, write_row};
use super::{ACCOUNT_COLUMNS, PostgresStore, TRANSFER_COLUMNS, account_from_row, corrupt, pg};

/// Account creations are serialized by this advisory lock ("STIPEND" and 3): a name and its
/// look-alikes are checked and the row inserted as one step.
const ACCOUNTS_LOCK: i64 = 0x5354_4950_454E_4403;

/// The operator's books on a shared database.
pub struct PostgresBooks {
    store: Arc<PostgresStore>,
    policy: StipendPolicy,
    clock: Arc<dyn Clock>,
    issuer: AccountId,
}

fn store_error(error: StoreError) -> LedgerError {
    LedgerError::Store(error)
}

/// A row read under its lock, and what leases hold of it.
struct Locked {
    record: AccountRecord,
    held_cu: i64,
}

/// Brings locked rows up to date (due stipends and expiries); the transfers that did it.
fn bring_rows_up_to_date(
    policy: &StipendPolicy,
    rows: &mut [Locked],
    issuer: AccountId,
    now_ms: i64,
) -> Result<Vec<Transfer>, LedgerError> {
    let mut transfers = Vec::new();
    for row in rows {
        let due = bring_up_to_date(
            policy,
            &mut row.record,
            row.held_cu as u64,
            issuer,
            now_ms,
            &mut TransferId::random,
        )
        .map_err(|error| store_error(corrupt(error)))?;
        transfers.extend(due);
    }
    Ok(transfers)
}

/// Writes locked rows back and appends the transfers that changed them.
async fn write_rows(
    transaction: &impl GenericClient,
    rows: &[Locked],
    transfers: &[Transfer],
) -> Result<(), LedgerError> {
    for row in rows {
        write_row(transaction, &row.record, row.held_cu)
            .await
            .map_err(store_error)?;
    }
    append(transaction, transfers).await.map_err(store_error)?;
    Ok(())
}

async fn lock_rows(
    client: &impl GenericClient,
    ids: &[AccountId],
) -> Result<Vec<Locked>, LedgerError> {
    let mut wanted: Vec<i64> = ids.iter().map(|id| id.0 as i64).collect();
    wanted.sort_unstable();
    let rows = client
        .query(
            &format!(
                "SELECT {ACCOUNT_COLUMNS}, held_cu FROM accounts WHERE id = ANY($1)
                 ORDER BY id FOR UPDATE"
            ),
            &[&wanted],
        )
        .await
        .map_err(|error| store_error(pg(error)))?;
    let mut locked = Vec::with_capacity(ids.len());
    for id in ids {
        let row = rows
            .iter()
            .find(|row| row.get::<_, i64>(0) == id.0 as i64)
            .ok_or_else(|| LedgerError::UnknownAccount {
                name: id.to_string(),
            })?;
        locked.push(Locked {
            record: account_from_row(row).map_err(store_error)?,
            held_cu: row.get(8),
        });
    }
    Ok(locked)
}

/// The transfer posted with this caller-chosen id, if any: the same content again is a replay,
/// other content a conflict.
async fn posted_before(
    client: &impl GenericClient,
    candidate: &Transfer,
) -> Result<Option<Posted>, LedgerError> {
    let rows = client
        .query(
            &format!(
                "SELECT {TRANSFER_COLUMNS} FROM transfers
                 WHERE id = $1 AND kind IN ('grant', 'gift', 'pool_contribution')"
            ),
            &[&candidate.id.0.to_be_bytes().as_slice()],
        )
        .await
        .map_err(|error| store_error(pg(error)))?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let existing = super::transfer_from_row(row).map_err(store_error)?;
    if existing.same_content(candidate) {
        Ok(Some(Posted {
            transfer: existing,
            replayed: true,
        }))
    } else {
        Err(LedgerError::TransferConflict { id: candidate.id })
    }
}

fn check_amount(amount_cu: u64) -> Result<(), LedgerError> {
    if amount_cu == 0 || amount_cu > AMOUNT_MAX_CU {
        return Err(LedgerError::InvalidAmount {
            reason: format!("the amount must be from 1 cu to {AMOUNT_MAX_CU} cu"),
        });
    }
    Ok(())
}

impl PostgresBooks {
    /// The books of the shared database behind `store` (opened with
    /// [`PostgresStore::open_shared`]): finds the issuer, creating it on a new database.
    pub fn open(
        store: Arc<PostgresStore>,
        policy: StipendPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<PostgresBooks, LedgerError> {
        let mut books = PostgresBooks {
            store,
            policy,
            clock,
            issuer: AccountId(0),
        };
        // Leases of servers that died are given back first, so that what a person has free
        // shows as free.
        books.store.reclaim_expired_leases()?;
        books.issuer = match books.store.account_by_name(ISSUER_NAME)? {
            Some(record) if record.kind == AccountKind::Issuer => record.id,
            Some(record) => {
                return Err(LedgerError::Store(StoreError::Corrupt(format!(
                    "account {ISSUER_NAME:?} exists but is a {} account",
                    record.kind
                ))));
            }
            // Several servers starting together on a new database: one makes the issuer, and the
            // others find it.
            None => match books.insert(ISSUER_NAME, AccountKind::Issuer) {
                Err(LedgerError::AccountExists { .. }) => books
                    .store
                    .account_by_name(ISSUER_NAME)?
                    .map(|record| record.id)
                    .ok_or_else(|| {
                        LedgerError::Store(StoreError::Corrupt(
                            "the issuer was made and then was gone".to_string(),
                        ))
                    })?,
                other => other?,
            },
        };
        Ok(books)
    }

    /// The issuer's account.
    pub fn issuer(&self) -> AccountId {
        self.issuer
    }

    /// Inserts a new account under the accounts lock, its name and look-alikes checked.
    fn insert(&self, name: &str, kind: AccountKind) -> Result<AccountId, LedgerError> {
        let normalized =
            normalize_account_name(name).map_err(|reason| LedgerError::InvalidName { reason })?;
        check_name_reserved(&normalized.name, kind)?;
        let now_ms = self.clock.now_ms();
        let result = self.store.read(move |client| {
            Box::pin(async move {
                let transaction = client.transaction().await.map_err(pg)?;
                transaction
                    .execute("SELECT pg_advisory_xact_lock($1)", &[&ACCOUNTS_LOCK])
                    .await
                    .map_err(pg)?;
                let taken = transaction
                    .query_opt(
                        "SELECT 1 FROM accounts WHERE name = $1",
                        &[&normalized.name],
                    )
                    .await
                    .map_err(pg)?;
                if taken.is_some() {
                    return Ok(Err(LedgerError::AccountExists {
                        name: normalized.name,
                    }));
                }
                if kind != AccountKind::Sink
                    && let Some(row) = transaction
                        .query_opt(
                            "SELECT name FROM accounts WHERE skeleton = $1 ORDER BY id LIMIT 1",
                            &[&normalized.skeleton],
                        )
                        .await
                        .map_err(pg)?
                {
                    return Ok(Err(LedgerError::NameConfusable {
                        name: normalized.name,
                        existing: row.get(0),
                    }));
                }
                let id: i64 = transaction
                    .query_one("SELECT COALESCE(MAX(id), 0) + 1 FROM accounts", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                transaction
                    .execute(
                        &format!(
                            "INSERT INTO accounts ({ACCOUNT_COLUMNS}, skeleton, next_expiry_ms)
                             VALUES ($1, $2, $3, 0, '[]', NULL, $4, '[]', $5, NULL)"
                        ),
                        &[
                            &id,
                            &normalized.name,
                            &kind.as_str(),
                            &now_ms,
                            &account_name_skeleton(&normalized.name),
                        ],
                    )
                    .await
                    .map_err(pg)?;
                transaction.commit().await.map_err(pg)?;
                Ok(Ok(AccountId(id as u64)))
            })
        })?;
        let id = result?;
        tracing::info!(account = %id, kind = %kind, "account created");
        Ok(id)
    }

    /// A row as its person sees it: what is due applied (not written: the next lease or grant
    /// writes it), what leases hold shown as reserved.
    fn view_of(&self, mut record: AccountRecord, held_cu: u64) -> Result<AccountView, LedgerError> {
        let now_ms = self.clock.now_ms();
        let mut counter = 0u128;
        bring_up_to_date(
            &self.policy,
            &mut record,
            held_cu,
            self.issuer,
            now_ms,
            &mut || {
                counter += 1;
                TransferId(counter)
            },
        )
        .map_err(|error| LedgerError::Store(StoreError::Corrupt(error.to_string())))?;
        let person = record.kind == AccountKind::Person;
        let grants = record.kind.holds_grants();
        Ok(AccountView {
            id: record.id,
            name: record.name,
            kind: record.kind,
            balance_cu: record.balance_cu,
            reserved_cu: held_cu,
            available_cu: if grants {
                (record.balance_cu.max(0) as u64).saturating_sub(held_cu)
            } else {
                0
            },
            next_grant_at_ms: person.then(|| self.policy.next_grant_at_ms(now_ms)),
            open_reservations: 0,
            lots: record.lots,
            usage: stipend_ledger::usage_in_period(&record.usage, self.policy.period_index(now_ms)),
            last_period: stipend_ledger::usage_in_period(
                &record.usage,
                self.policy.period_index(now_ms) - 1,
            ),
            daily: stipend_ledger::usage_by_day(
                &record.usage,
                stipend_ledger::first_day_kept(now_ms),
            ),
        })
    }

    /// Runs `change` on rows locked in one transaction, each brought up to date first; writes
    /// them back and appends what is due and what `change` posts.
    fn change(
        &self,
        ids: Vec<AccountId>,
        candidate: Transfer,
        change: impl FnOnce(&mut [Locked], &Transfer) -> Result<(), LedgerError> + Send + 'static,
    ) -> Result<Posted, LedgerError> {
        let policy = self.policy;
        let issuer = self.issuer;
        let now_ms = self.clock.now_ms();
        self.store.read(move |client| {
            Box::pin(async move {
                let transaction = client.transaction().await.map_err(pg)?;
                let result = async {
                    if let Some(posted) = posted_before(&transaction, &candidate).await? {
                        return Ok(posted);
                    }
                    let mut rows = lock_rows(&transaction, &ids).await?;
                    let mut transfers = bring_rows_up_to_date(&policy, &mut rows, issuer, now_ms)?;
                    change(&mut rows, &candidate)?;
                    transfers.push(candidate);
                    write_rows(&transaction, &rows, &transfers).await?;
                    Ok(Posted {
                        transfer: candidate,
                        replayed: false,
                    })
                }
                .await;
                match result {
                    Ok(posted) => {
                        transaction.commit().await.map_err(pg)?;
                        Ok(Ok(posted))
                    }
                    // Dropping the transaction rolls it back: nothing changed.
                    Err(error) => Ok(Err(error)),
                }
            })
        })?
    }

    /// Audits the shared database: every grant-holding row against the whole log (escrow keeps
    /// rows current, so nothing is replayed), its lots, and its leases; the issuer's and sinks'
    /// balances are the sums of their transfers.
    pub fn verify(&self) -> Result<stipend_ledger::VerifyReport, LedgerError> {
        let report = self.store.read(|client| {
            Box::pin(async move {
                let transaction = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(pg)?;
                let rows = transaction
                    .query(
                        &format!(
                            "WITH credits AS (SELECT credit_account AS id, SUM(amount_cu) AS total
                                              FROM transfers GROUP BY credit_account),
                                  debits AS (SELECT debit_account AS id, SUM(amount_cu) AS total
                                             FROM transfers GROUP BY debit_account),
                                  leased AS (SELECT account_id AS id, SUM(remaining_cu) AS total
                                             FROM leases GROUP BY account_id)
                             SELECT {ACCOUNT_COLUMNS}, held_cu,
                                    (COALESCE(credits.total, 0) - COALESCE(debits.total, 0))::text,
                                    COALESCE(leased.total, 0)::text
                             FROM accounts
                             LEFT JOIN credits USING (id)
                             LEFT JOIN debits USING (id)
                             LEFT JOIN leased USING (id)
                             ORDER BY id"
                        ),
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                let n_transfers: i64 = transaction
                    .query_one("SELECT COUNT(*) FROM transfers", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                transaction.commit().await.map_err(pg)?;
                let mut report = stipend_ledger::VerifyReport {
                    n_transfers: n_transfers as u64,
                    ..Default::default()
                };
                for row in &rows {
                    let record = account_from_row(row)?;
                    let held: i64 = row.get(8);
                    let net: i128 = row
                        .get::<_, &str>(9)
                        .parse()
                        .map_err(|_| corrupt("a sum of transfers is not an integer"))?;
                    let leased: i128 = row
                        .get::<_, &str>(10)
                        .parse()
                        .map_err(|_| corrupt("a sum of leases is not an integer"))?;
                    report.n_accounts += 1;
                    report.balance_sum_cu += net;
                    let id = record.id;
                    if !record.kind.holds_grants() {
                        continue;
                    }
                    if i128::from(record.balance_cu) != net {
                        report.violations.push(format!(
                            "account {id}: the row says {} cu, its transfers {net} cu",
                            record.balance_cu
                        ));
                    }
                    let lots: i128 = record
                        .lots
                        .iter()
                        .map(|lot| i128::from(lot.remaining_cu))
                        .sum();
                    if lots != i128::from(record.balance_cu) {
                        report.violations.push(format!(
                            "account {id}: lots sum to {lots} cu but the balance is {} cu",
                            record.balance_cu
                        ));
                    }
                    if i128::from(held) != leased {
                        report.violations.push(format!(
                            "account {id}: held_cu is {held} but its leases hold {leased}"
                        ));
                    }
                    if held < 0 || held > record.balance_cu {
                        report.violations.push(format!(
                            "account {id}: leases hold {held} cu of a balance of {} cu",
                            record.balance_cu
                        ));
                    }
                }
                if report.balance_sum_cu != 0 {
                    report.violations.push(format!(
                        "balances sum to {} cu, not 0",
                        report.balance_sum_cu
                    ));
                }
                Ok(report)
            })
        })?;
        Ok(report)
    }
}

impl Books for PostgresBooks {
    fn account_id(&self, name: &str) -> Result<AccountId, LedgerError> {
        let normalized: String = unicode_nfkc(name);
        for candidate in [normalized.as_str(), name] {
            if let Some(record) = self.store.account_by_name(candidate)? {
                return Ok(record.id);
            }
        }
        Err(LedgerError::UnknownAccount {
            name: name.to_string(),
        })
    }

    fn view(&self, id: AccountId) -> Result<AccountView, LedgerError> {
        let (record, held) =
            self.store
                .account_held(id)?
                .ok_or_else(|| LedgerError::UnknownAccount {
                    name: id.to_string(),
                })?;
        self.view_of(record, held)
    }

    fn views(
        &self,
        after: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountView>, LedgerError> {
        self.store
            .accounts_held(after, limit)?
            .into_iter()
            .map(|(record, held)| self.view_of(record, held))
            .collect()
    }

    fn create_account(&self, name: &str, kind: AccountKind) -> Result<AccountId, LedgerError> {
        if kind == AccountKind::Issuer {
            return Err(LedgerError::WrongKind {
                account: self.issuer,
                kind,
                operation: "be created (there is exactly one issuer)",
            });
        }
        self.insert(name, kind)
    }

    fn sink(&self, name: &str) -> Result<AccountId, LedgerError> {
        match self.account_id(name) {
            Ok(id) => {
                let kind = self.view(id)?.kind;
                if kind != AccountKind::Sink {
                    return Err(LedgerError::WrongKind {
                        account: id,
                        kind,
                        operation: "be used as a sink",
                    });
                }
                Ok(id)
            }
            Err(LedgerError::UnknownAccount { .. }) => match self.insert(name, AccountKind::Sink) {
                Err(LedgerError::AccountExists { .. }) => self.account_id(name),
                other => other,
            },
            Err(error) => Err(error),
        }
    }

    fn grant(
        &self,
        id: TransferId,
        to: AccountId,
        amount_cu: u64,
        expires_at_ms: Option<i64>,
    ) -> Result<Posted, LedgerError> {
        check_amount(amount_cu)?;
        let now_ms = self.clock.now_ms();
        if expires_at_ms.is_some_and(|expires| expires <= now_ms) {
            return Err(LedgerError::InvalidAmount {
                reason: "the grant's expiry is in the past".to_string(),
            });
        }
        let candidate = Transfer {
            id,
            kind: TransferKind::Grant,
            debit: self.issuer,
            credit: to,
            amount_cu,
            created_at_ms: now_ms,
            lot_expires_at_ms: expires_at_ms,
            period: None,
        };
        let posted = self.change(vec![to], candidate, move |rows, transfer| {
            let row = &mut rows[0];
            let kind = row.record.kind;
            if !kind.holds_grants() {
                return Err(LedgerError::WrongKind {
                    account: to,
                    kind,
                    operation: "receive a grant",
                });
            }
            if row
                .record
                .balance_cu
                .checked_add(amount_cu as i64)
                .is_none()
            {
                return Err(LedgerError::BalanceLimit { account: to });
            }
            grant(&mut row.record, transfer).map_err(|_| LedgerError::TooManyLots { account: to })
        })?;
        if !posted.replayed {
            tracing::info!(account = %to, amount_cu, "operator grant");
        }
        Ok(posted)
    }

    fn give(
        &self,
        id: TransferId,
        from: AccountId,
        to: AccountId,
        amount_cu: u64,
    ) -> Result<Posted, LedgerError> {
        check_amount(amount_cu)?;
        if from == to {
            return Err(LedgerError::SameAccount);
        }
        let to_kind = self.view(to)?.kind;
        let kind = if to_kind == AccountKind::Pool {
            TransferKind::PoolContribution
        } else {
            TransferKind::Gift
        };
        let now_ms = self.clock.now_ms();
        let candidate = Transfer {
            id,
            kind,
            debit: from,
            credit: to,
            amount_cu,
            created_at_ms: now_ms,
            lot_expires_at_ms: None,
            period: None,
        };
        let next_grant_at_ms = self.policy.next_grant_at_ms(now_ms);
        let posted = self.change(vec![from, to], candidate, move |rows, transfer| {
            for (row, operation) in rows.iter().zip(["give compute", "receive a gift"]) {
                let kind = row.record.kind;
                if !kind.holds_grants() {
                    return Err(LedgerError::WrongKind {
                        account: row.record.id,
                        kind,
                        operation,
                    });
                }
            }
            let available_cu =
                (rows[0].record.balance_cu.max(0) as u64).saturating_sub(rows[0].held_cu as u64);
            if available_cu < amount_cu {
                return Err(LedgerError::InsufficientBalance {
                    account: from,
                    needed_cu: amount_cu,
                    available_cu,
                    next_grant_at_ms: (rows[0].record.kind == AccountKind::Person)
                        .then_some(next_grant_at_ms),
                });
            }
            if rows[1]
                .record
                .balance_cu
                .checked_add(amount_cu as i64)
                .is_none()
            {
                return Err(LedgerError::BalanceLimit { account: to });
            }
            let (giver, recipient) = rows.split_at_mut(1);
            give(&mut giver[0].record, &mut recipient[0].record, transfer)
                .map_err(|_| LedgerError::TooManyLots { account: to })
        })?;
        if !posted.replayed {
            tracing::info!(from = %from, to = %to, amount_cu, "gift");
        }
        Ok(posted)
    }

    fn close(&self, id: AccountId) -> Result<Option<Posted>, LedgerError> {
        let policy = self.policy;
        let issuer = self.issuer;
        let now_ms = self.clock.now_ms();
        let closed = self.store.read(move |client| {
            Box::pin(async move {
                let transaction = client.transaction().await.map_err(pg)?;
                let result = async {
                    let mut rows = lock_rows(&transaction, &[id, issuer]).await?;
                    let kind = rows[0].record.kind;
                    if kind == AccountKind::Closed {
                        return Ok(None);
                    }
                    if !matches!(kind, AccountKind::Person | AccountKind::Pool) {
                        return Err(LedgerError::WrongKind {
                            account: id,
                            kind,
                            operation: "be closed",
                        });
                    }
                    // Compute leased to servers is in calls' hands until the leases end.
                    if rows[0].held_cu > 0 {
                        return Err(LedgerError::AccountBusy {
                            account: id,
                            reserved_cu: rows[0].held_cu as u64,
                        });
                    }
                    let mut transfers = bring_rows_up_to_date(&policy, &mut rows, issuer, now_ms)?;
                    let closure = Transfer {
                        id: TransferId::random(),
                        kind: TransferKind::Closure,
                        debit: id,
                        credit: issuer,
                        amount_cu: rows[0].record.balance_cu.max(0) as u64,
                        created_at_ms: now_ms,
                        lot_expires_at_ms: None,
                        period: None,
                    };
                    let (closing, issuing) = rows.split_at_mut(1);
                    give(&mut closing[0].record, &mut issuing[0].record, &closure)
                        .map_err(|error| store_error(corrupt(error)))?;
                    transfers.push(closure);
                    write_rows(&transaction, &rows, &transfers).await?;
                    Ok(Some(Posted {
                        transfer: closure,
                        replayed: false,
                    }))
                }
                .await;
                match result {
                    Ok(posted) => {
                        transaction.commit().await.map_err(pg)?;
                        Ok(Ok(posted))
                    }
                    Err(error) => Ok(Err(error)),
                }
            })
        })??;
        if let Some(posted) = &closed {
            tracing::info!(account = %id, amount_cu = posted.transfer.amount_cu, "account closed");
        }
        Ok(closed)
    }

    fn erase_names(&self, id: AccountId, anonymous_name: &str) -> Result<(), LedgerError> {
        let kind = self.view(id)?.kind;
        if kind != AccountKind::Closed {
            return Err(LedgerError::WrongKind {
                account: id,
                kind,
                operation: "lose its name (close it first)",
            });
        }
        Ok(self.store.erase_names(id, anonymous_name)?)
    }

    fn history(&self, id: AccountId, limit: usize) -> Result<Vec<Transfer>, LedgerError> {
        Ok(self.store.transfers_of(id, limit)?)
    }

    fn check_invariants(&self) -> Vec<String> {
        // Nothing is decided in memory here; the database's own audit is `verify`.
        Vec::new()
    }

    fn policy(&self) -> &StipendPolicy {
        &self.policy
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store) as Arc<dyn Store>
    }
}

fn unicode_nfkc(name: &str) -> String {
    stipend_ledger::normalize_account_name(name)
        .map(|normalized| normalized.name)
        .unwrap_or_else(|_| name.to_string())
}
