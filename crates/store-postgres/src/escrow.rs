//! Escrow on PostgreSQL: the statements by which several nodes share one database's balances
//! (see `stipend_ledger::escrow` for the rules). A lease is taken by one conditional statement
//! when the account's row has nothing due; settles are committed many to a transaction, each
//! fenced by its lease's expiry by the database's own clock; expired leases are given back by
//! anyone who asks. The `leases_within_balance` constraint backs every one of them.

use std::collections::BTreeMap;
use std::time::Duration;

use stipend_ledger::escrow::{
    Lease, LeaseSpend, SpendOutcome, bring_up_to_date, is_up_to_date, next_expiry_ms, spend,
};
use stipend_ledger::store::rows::{lots_json, usage_json};
use stipend_ledger::{AccountId, AccountRecord, StipendPolicy, StoreError, Transfer, TransferId};
use tokio_postgres::GenericClient;

use super::{
    ACCOUNT_COLUMNS, PostgresStore, TRANSFER_COLUMNS, account_from_row, corrupt, migrate, pg,
};

/// What a lease request needs besides the account: the policy (for what is due), the issuer
/// (stipends come from it), and who asks.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    /// The stipend policy.
    pub policy: StipendPolicy,
    /// The issuer's account.
    pub issuer: AccountId,
    /// The node asking, for the operator's eyes (`leases.node`).
    pub node: String,
    /// How long the lease lives without renewal, by the database's clock.
    pub ttl: Duration,
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

/// Writes an account row as escrow changes it: balance, lots, stipend, usage, what leases hold.
pub(crate) async fn write_row(
    client: &impl GenericClient,
    record: &AccountRecord,
    held_cu: i64,
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE accounts SET balance_cu = $2, lots = $3, stipend_period = $4, usage = $5,
                                 held_cu = $6, next_expiry_ms = $7, kind = $8
             WHERE id = $1",
            &[
                &(record.id.0 as i64),
                &record.balance_cu,
                &lots_json(&record.lots)?,
                &record.stipend_period,
                &usage_json(&record.usage)?,
                &held_cu,
                &next_expiry_ms(&record.lots),
                &record.kind.as_str(),
            ],
        )
        .await
        .map_err(pg)?;
    Ok(())
}

/// Appends transfers, numbered by the transfers' sequence in the order given, in one statement
/// (the sequence's numbers are drawn first, in order, so the log keeps the order decided).
/// Returns the last number drawn, if any was.
pub(crate) async fn append(
    client: &impl GenericClient,
    transfers: &[Transfer],
) -> Result<Option<i64>, StoreError> {
    if transfers.is_empty() {
        return Ok(None);
    }
    let seqs: Vec<i64> = client
        .query(
            "SELECT nextval('transfers_seq') FROM generate_series(1::bigint, $1::bigint)",
            &[&(transfers.len() as i64)],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut ids = Vec::with_capacity(transfers.len());
    let mut kinds = Vec::with_capacity(transfers.len());
    let mut debits = Vec::with_capacity(transfers.len());
    let mut credits = Vec::with_capacity(transfers.len());
    let mut amounts = Vec::with_capacity(transfers.len());
    let mut times = Vec::with_capacity(transfers.len());
    let mut expiries = Vec::with_capacity(transfers.len());
    let mut periods = Vec::with_capacity(transfers.len());
    for transfer in transfers {
        ids.push(transfer.id.0.to_be_bytes().to_vec());
        kinds.push(transfer.kind.as_str());
        debits.push(transfer.debit.0 as i64);
        credits.push(transfer.credit.0 as i64);
        amounts.push(transfer.amount_cu as i64);
        times.push(transfer.created_at_ms);
        expiries.push(transfer.lot_expires_at_ms);
        periods.push(transfer.period);
    }
    client
        .execute(
            &format!(
                "INSERT INTO transfers (seq, {TRANSFER_COLUMNS})
                 SELECT * FROM UNNEST($1::bigint[], $2::bytea[], $3::text[], $4::bigint[],
                                      $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[],
                                      $9::bigint[])"
            ),
            &[
                &seqs, &ids, &kinds, &debits, &credits, &amounts, &times, &expiries, &periods,
            ],
        )
        .await
        .map_err(pg)?;
    Ok(seqs.last().copied())
}

/// Marks the database as shared by nodes, once: from then on a single writer's engine, whose
/// checkpoints would overwrite what the nodes decide, refuses it. A database a single writer
/// left with rows behind its log (a crash: the log's tail not yet checkpointed) is refused
/// until one server has opened and closed it cleanly.
async fn share(client: &mut tokio_postgres::Client) -> Result<(), StoreError> {
    let transaction = client.transaction().await.map_err(pg)?;
    transaction
        .execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&super::MIGRATION_LOCK],
        )
        .await
        .map_err(pg)?;
    let shared = transaction
        .query_opt("SELECT 1 FROM meta WHERE key = 'shared'", &[])
        .await
        .map_err(pg)?;
    if shared.is_none() {
        let free: bool = transaction
            .query_one(
                "SELECT pg_try_advisory_xact_lock($1)",
                &[&super::WRITER_LOCK],
            )
            .await
            .map_err(pg)?
            .get(0);
        if !free {
            return Err(StoreError::Locked {
                path: "a database a single-writer server holds".to_string(),
            });
        }
        let behind: bool = transaction
            .query_one(
                "SELECT (SELECT value FROM meta WHERE key = 'checkpoint_seq')
                        < (SELECT COALESCE(MAX(seq), 0) FROM transfers)",
                &[],
            )
            .await
            .map_err(pg)?
            .get(0);
        if behind {
            return Err(StoreError::Corrupt(
                "the database's account rows are behind its log (a single server stopped \
                 without closing it); open it with one server once, stop it cleanly, then share it"
                    .to_string(),
            ));
        }
        transaction
            .execute("INSERT INTO meta (key, value) VALUES ('shared', 1)", &[])
            .await
            .map_err(pg)?;
        tracing::info!("the database is now shared by escrow nodes");
    }
    transaction.commit().await.map_err(pg)
}

impl PostgresStore {
    /// Connects as one of several nodes sharing the database: migrates it if needed (once, under
    /// the migration lock) and claims nothing. Escrow statements run on such a store.
    pub fn open_shared(url: &str) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore::connect(url)?;
        let pool = std::sync::Arc::clone(&store.pool);
        store.run(async move {
            let mut client = pool.connect().await?;
            migrate(&mut client).await?;
            share(&mut client).await?;
            pool.put(client);
            Ok(())
        })?;
        Ok(store)
    }

    /// Takes a lease of up to `want_cu`, and at least `min_cu`, of `account`'s available balance
    /// (its balance less what leases hold), or `None` if less than `min_cu` is available. When
    /// the row has nothing due this is one conditional statement; otherwise the row is first
    /// brought up to date (its stipends and expiries applied and recorded) under its lock, and
    /// the lease taken in the same transaction.
    pub fn take_lease(
        &self,
        request: &LeaseRequest,
        account: AccountId,
        want_cu: u64,
        min_cu: u64,
        now_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        let request = request.clone();
        self.read(move |client| {
            Box::pin(async move {
                let want = want_cu.min(i64::MAX as u64) as i64;
                let min = min_cu.max(1).min(i64::MAX as u64) as i64;
                let ttl = seconds(request.ttl);
                // The grant is computed from the row as the statement first sees it; the UPDATE
                // then checks it against the row as it finds it (the latest committed version,
                // under READ COMMITTED), so two nodes racing for the last compute cannot both
                // win: the loser's condition fails, and it takes the slow path below.
                let fast = client
                    .query(
                        "WITH up AS (
                             UPDATE accounts AS a SET held_cu = a.held_cu + g.grant_cu
                             FROM (SELECT id, LEAST($2, balance_cu - held_cu) AS grant_cu
                                   FROM accounts WHERE id = $1) AS g
                             WHERE a.id = g.id
                               AND a.kind IN ('person', 'pool', 'agent')
                               AND (a.kind <> 'person' OR a.stipend_period = $3)
                               AND (a.next_expiry_ms IS NULL OR a.next_expiry_ms > $4)
                               AND g.grant_cu >= $5
                               AND a.balance_cu - a.held_cu >= g.grant_cu
                             RETURNING a.id, g.grant_cu, a.balance_cu - a.held_cu AS available_cu
                         ),
                         lease AS (
                             INSERT INTO leases
                                 (account_id, node, remaining_cu, granted_cu, expires_at)
                             SELECT id, $6, grant_cu, grant_cu, now() + make_interval(secs => $7)
                             FROM up
                             RETURNING id, account_id
                         )
                         SELECT lease.id, up.grant_cu, up.available_cu
                         FROM lease JOIN up ON up.id = lease.account_id",
                        &[
                            &(account.0 as i64),
                            &want,
                            &request.policy.period_index(now_ms),
                            &now_ms,
                            &min,
                            &request.node,
                            &ttl,
                        ],
                    )
                    .await
                    .map_err(pg)?;
                if let Some(row) = fast.first() {
                    return Ok(Some(Lease {
                        id: row.get(0),
                        account,
                        granted_cu: row.get::<_, i64>(1) as u64,
                        available_cu: row.get::<_, i64>(2).max(0) as u64,
                        ttl: request.ttl,
                    }));
                }
                take_slowly(client, &request, account, want, min, now_ms).await
            })
        })
    }

    /// Renews a lease for another `ttl` from now, by the database's clock, if it is still live.
    /// Returns whether it was.
    pub fn renew_lease(&self, lease: i64, ttl: Duration) -> Result<bool, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let renewed = client
                    .execute(
                        "UPDATE leases SET expires_at = now() + make_interval(secs => $2)
                         WHERE id = $1 AND expires_at > now()",
                        &[&lease, &seconds(ttl)],
                    )
                    .await
                    .map_err(pg)?;
                Ok(renewed == 1)
            })
        })
    }

    /// Gives a lease back: what it still holds becomes available again. Returns that amount
    /// (zero if the lease had already gone).
    pub fn release_lease(&self, lease: i64) -> Result<u64, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "WITH gone AS (DELETE FROM leases WHERE id = $1
                                       RETURNING account_id, remaining_cu)
                         UPDATE accounts AS a SET held_cu = a.held_cu - gone.remaining_cu
                         FROM gone WHERE a.id = gone.account_id
                         RETURNING gone.remaining_cu",
                        &[&lease],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.first().map_or(0, |row| row.get::<_, i64>(0) as u64))
            })
        })
    }

    /// Gives `amount_cu` of a lease back (to its account's available balance), keeping the rest.
    /// Returns false if the lease no longer held that much.
    pub fn shrink_lease(&self, lease: i64, amount_cu: u64) -> Result<bool, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let amount = amount_cu.min(i64::MAX as u64) as i64;
                let changed = client
                    .execute(
                        "WITH shrunk AS (UPDATE leases SET remaining_cu = remaining_cu - $2
                                         WHERE id = $1 AND remaining_cu >= $2
                                         RETURNING account_id)
                         UPDATE accounts AS a SET held_cu = a.held_cu - $2
                         FROM shrunk WHERE a.id = shrunk.account_id",
                        &[&lease, &amount],
                    )
                    .await
                    .map_err(pg)?;
                Ok(changed == 1)
            })
        })
    }

    /// Whether the settle batch whose first transfer is `first` was committed.
    pub fn settled(&self, first: TransferId) -> Result<bool, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let found = client
                    .query_opt(
                        "SELECT 1 FROM settle_batches WHERE id = $1",
                        &[&first.0.to_be_bytes().as_slice()],
                    )
                    .await
                    .map_err(pg)?;
                Ok(found.is_some())
            })
        })
    }

    /// Gives back every lease past its expiry, whoever held it (a node that was killed, or
    /// paused past its deadline). Returns how many.
    pub fn reclaim_expired_leases(&self) -> Result<u64, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                // The marks of settle batches are wanted only while a node may still ask.
                client
                    .execute(
                        "DELETE FROM settle_batches WHERE committed_at < now() - interval '1 hour'",
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                let rows = client
                    .query(
                        "WITH gone AS (DELETE FROM leases WHERE expires_at <= now()
                                       RETURNING account_id, remaining_cu),
                              held AS (SELECT account_id, SUM(remaining_cu) AS total, COUNT(*) AS n
                                       FROM gone GROUP BY account_id)
                         UPDATE accounts AS a SET held_cu = a.held_cu - held.total
                         FROM held WHERE a.id = held.account_id
                         RETURNING held.n",
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|row| row.get::<_, i64>(0) as u64).sum())
            })
        })
    }

    /// Commits spends decided against leases, all in one transaction. Each is charged against
    /// its lease if the lease is still live by the database's clock; one whose lease has gone is
    /// charged against what its account has available, as far as that goes (see
    /// [`SpendOutcome`]). Rows are locked in account order, so that nodes settling the same
    /// accounts at once wait for each other instead of deadlocking.
    pub fn settle_leased(&self, spends: &[LeaseSpend]) -> Result<Vec<SpendOutcome>, StoreError> {
        let spends = spends.to_vec();
        self.read(move |client| Box::pin(async move { settle(client, spends).await }))
    }

    /// An account's row and what leases hold of it.
    pub fn account_held(&self, id: AccountId) -> Result<Option<(AccountRecord, u64)>, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let row = client
                    .query_opt(
                        &format!("SELECT {ACCOUNT_COLUMNS}, held_cu FROM accounts WHERE id = $1"),
                        &[&(id.0 as i64)],
                    )
                    .await
                    .map_err(pg)?;
                row.map(|row| {
                    let held: i64 = row.get(8);
                    account_from_row(&row).map(|record| (record, held.max(0) as u64))
                })
                .transpose()
            })
        })
    }

    /// Up to `limit` accounts after `after` in id order, each with what leases hold of it.
    pub fn accounts_held(
        &self,
        after: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<(AccountRecord, u64)>, StoreError> {
        let after = after.map_or(0, |id| id.0 as i64);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {ACCOUNT_COLUMNS}, held_cu FROM accounts WHERE id > $1
                             ORDER BY id LIMIT $2"
                        ),
                        &[&after, &limit],
                    )
                    .await
                    .map_err(pg)?;
                rows.iter()
                    .map(|row| {
                        let held: i64 = row.get(8);
                        account_from_row(row).map(|record| (record, held.max(0) as u64))
                    })
                    .collect()
            })
        })
    }

    /// What leases hold of an account, and how many there are (for tests and operators).
    pub fn held(&self, account: AccountId) -> Result<(u64, u64), StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let row = client
                    .query_one(
                        "SELECT a.held_cu,
                                (SELECT COALESCE(SUM(remaining_cu), 0)::bigint FROM leases
                                 WHERE account_id = a.id),
                                (SELECT COUNT(*) FROM leases WHERE account_id = a.id)
                         FROM accounts AS a WHERE a.id = $1",
                        &[&(account.0 as i64)],
                    )
                    .await
                    .map_err(pg)?;
                let held: i64 = row.get(0);
                let leased: i64 = row.get(1);
                if held != leased {
                    return Err(corrupt(format!(
                        "account {account}: held_cu {held} but its leases hold {leased}"
                    )));
                }
                Ok((held as u64, row.get::<_, i64>(2) as u64))
            })
        })
    }
}

/// The slow path of a lease: the row locked, brought up to date, and the lease taken in the same
/// transaction.
async fn take_slowly(
    client: &mut tokio_postgres::Client,
    request: &LeaseRequest,
    account: AccountId,
    want: i64,
    min: i64,
    now_ms: i64,
) -> Result<Option<Lease>, StoreError> {
    let transaction = client.transaction().await.map_err(pg)?;
    let Some(row) = transaction
        .query_opt(
            &format!("SELECT {ACCOUNT_COLUMNS}, held_cu FROM accounts WHERE id = $1 FOR UPDATE"),
            &[&(account.0 as i64)],
        )
        .await
        .map_err(pg)?
    else {
        return Ok(None);
    };
    let mut record = account_from_row(&row)?;
    let held: i64 = row.get(8);
    if !record.kind.holds_grants() {
        return Ok(None);
    }
    if !is_up_to_date(&request.policy, &record, now_ms) {
        let transfers = bring_up_to_date(
            &request.policy,
            &mut record,
            held as u64,
            request.issuer,
            now_ms,
            &mut TransferId::random,
        )
        .map_err(|error| corrupt(error.to_string()))?;
        append(&transaction, &transfers).await?;
    }
    let available = record.balance_cu - held;
    let lease = if available >= min {
        let grant = want.min(available);
        let row = transaction
            .query_one(
                "INSERT INTO leases (account_id, node, remaining_cu, granted_cu, expires_at)
                 VALUES ($1, $2, $3, $3, now() + make_interval(secs => $4))
                 RETURNING id",
                &[
                    &(account.0 as i64),
                    &request.node,
                    &grant,
                    &seconds(request.ttl),
                ],
            )
            .await
            .map_err(pg)?;
        write_row(&transaction, &record, held + grant).await?;
        Some(Lease {
            id: row.get(0),
            account,
            granted_cu: grant as u64,
            available_cu: (available - grant).max(0) as u64,
            ttl: request.ttl,
        })
    } else {
        write_row(&transaction, &record, held).await?;
        None
    };
    transaction.commit().await.map_err(pg)?;
    Ok(lease)
}

async fn settle(
    client: &mut tokio_postgres::Client,
    spends: Vec<LeaseSpend>,
) -> Result<Vec<SpendOutcome>, StoreError> {
    let transaction = client.transaction().await.map_err(pg)?;
    if let Some(first) = spends.first() {
        transaction
            .execute(
                "INSERT INTO settle_batches (id) VALUES ($1)",
                &[&first.transfer.id.0.to_be_bytes().as_slice()],
            )
            .await
            .map_err(pg)?;
    }
    // The leases still live, charged in one statement; a lease is live while its expiry (by the
    // database's clock) is ahead, and it holds at least what is spent on it.
    let mut per_lease: BTreeMap<i64, i64> = BTreeMap::new();
    for spend in &spends {
        *per_lease.entry(spend.lease).or_default() += spend.transfer.amount_cu as i64;
    }
    let (lease_ids, amounts): (Vec<i64>, Vec<i64>) = per_lease.into_iter().unzip();
    let live: std::collections::HashSet<i64> = transaction
        .query(
            "UPDATE leases AS l SET remaining_cu = l.remaining_cu - s.amount
             FROM UNNEST($1::bigint[], $2::bigint[]) AS s(id, amount)
             WHERE l.id = s.id AND l.expires_at > now() AND l.remaining_cu >= s.amount
             RETURNING l.id",
            &[&lease_ids, &amounts],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // The accounts, locked in id order.
    let mut account_ids: Vec<i64> = spends
        .iter()
        .map(|spend| spend.transfer.debit.0 as i64)
        .collect();
    account_ids.sort_unstable();
    account_ids.dedup();
    let mut rows: BTreeMap<i64, (AccountRecord, i64)> = BTreeMap::new();
    for row in transaction
        .query(
            &format!(
                "SELECT {ACCOUNT_COLUMNS}, held_cu FROM accounts WHERE id = ANY($1)
                 ORDER BY id FOR UPDATE"
            ),
            &[&account_ids],
        )
        .await
        .map_err(pg)?
    {
        let record = account_from_row(&row)?;
        rows.insert(record.id.0 as i64, (record, row.get(8)));
    }
    let mut outcomes = Vec::with_capacity(spends.len());
    let mut charged = Vec::with_capacity(spends.len());
    for item in &spends {
        let (record, held) = rows
            .get_mut(&(item.transfer.debit.0 as i64))
            .ok_or_else(|| corrupt(format!("a spend names no account {}", item.transfer.debit)))?;
        let amount = item.transfer.amount_cu as i64;
        let (outcome, charge) = if live.contains(&item.lease) {
            *held -= amount;
            (SpendOutcome::Charged, amount)
        } else {
            let available = (record.balance_cu - *held).max(0);
            let charge = amount.min(available);
            (
                SpendOutcome::Unleased {
                    shortfall_cu: (amount - charge) as u64,
                },
                charge,
            )
        };
        outcomes.push(outcome);
        if charge > 0 {
            let transfer = Transfer {
                amount_cu: charge as u64,
                ..item.transfer
            };
            spend(record, &transfer).map_err(|error| corrupt(error.to_string()))?;
            charged.push(transfer);
        }
    }
    for (record, held) in rows.values() {
        write_row(&transaction, record, *held).await?;
    }
    append(&transaction, &charged).await?;
    transaction.commit().await.map_err(pg)?;
    Ok(outcomes)
}

/// The database as one node of several sees it: the escrow statements, with this node's name and
/// its leases' life.
pub struct PostgresEscrow {
    store: std::sync::Arc<PostgresStore>,
    request: LeaseRequest,
}

impl PostgresEscrow {
    /// The escrow of `store` (opened with [`PostgresStore::open_shared`]) for one node.
    pub fn new(store: std::sync::Arc<PostgresStore>, request: LeaseRequest) -> PostgresEscrow {
        PostgresEscrow { store, request }
    }
}

impl stipend_ledger::node::EscrowStore for PostgresEscrow {
    fn take_lease(
        &self,
        account: AccountId,
        want_cu: u64,
        min_cu: u64,
        now_ms: i64,
    ) -> Result<Option<Lease>, StoreError> {
        self.store
            .take_lease(&self.request, account, want_cu, min_cu, now_ms)
    }

    fn renew_lease(&self, lease: i64) -> Result<bool, StoreError> {
        self.store.renew_lease(lease, self.request.ttl)
    }

    fn release_lease(&self, lease: i64) -> Result<u64, StoreError> {
        self.store.release_lease(lease)
    }

    fn shrink_lease(&self, lease: i64, amount_cu: u64) -> Result<bool, StoreError> {
        self.store.shrink_lease(lease, amount_cu)
    }

    fn settle_leased(&self, spends: &[LeaseSpend]) -> Result<Vec<SpendOutcome>, StoreError> {
        self.store.settle_leased(spends)
    }

    fn reclaim_expired_leases(&self) -> Result<u64, StoreError> {
        self.store.reclaim_expired_leases()
    }

    fn settled(&self, first: TransferId) -> Result<bool, StoreError> {
        self.store.settled(first)
    }

    fn account_held(&self, id: AccountId) -> Result<Option<(AccountRecord, u64)>, StoreError> {
        self.store.account_held(id)
    }

    fn lease_ttl(&self) -> Duration {
        self.request.ttl
    }
}
