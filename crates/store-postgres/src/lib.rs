//! The PostgreSQL store: the ledger's [`Store`] on a database server, with the same schema and
//! the same meaning as the embedded SQLite store's, for an operator who keeps the ledger where
//! their backups, replicas and monitoring already are.
//!
//! One process writes (it holds a session advisory lock for as long as the store is open), any
//! number read, also while it runs: each read runs on a pooled connection, and the reads that must
//! agree with each other (the recovery tail, the audit) run in one `REPEATABLE READ` transaction.
//! Every commit is one transaction, durable when PostgreSQL acknowledges it (`synchronous_commit`
//! as the server sets it; on by default); the ledger's writer batches many changes into each, and a
//! batch travels as arrays (`UNNEST`), so a commit is a handful of statements whatever its size.
//!
//! The [`Store`] trait is synchronous, and its callers include async tasks, where a blocking
//! client (which runs a runtime of its own) would panic. So the store owns a small runtime that
//! drives its connections; each call hands its work to it and waits on a plain channel, which
//! blocks the calling thread as a disk read of the SQLite store would.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use stipend_ledger::store::rows::{
    lots_from_json, lots_json, model_access_from_json, model_access_json, usage_from_json,
    usage_json,
};
use stipend_ledger::{
    ACCOUNT_NAME_SKELETON_VERSION, AccessRules, AccountId, AccountKind, AccountRecord, AuditRow,
    Batch, KeptReport, KeyCap, KeyRecord, KeySpend, OperatorAction, Store, StoreError, Transfer,
    TransferAudit, TransferId, TransferKind, account_name_skeleton,
};
use tokio_postgres::{Client, Config, IsolationLevel, NoTls, Row};

mod books;
mod escrow;
pub mod faults;
mod journal;
pub mod test_server;
mod tls;

pub use books::PostgresBooks;
pub use escrow::{LeaseRequest, PostgresEscrow};
pub use journal::PostgresJournal;

/// The schema, one migration per entry; `stipend_schema.version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('checkpoint_seq', 0), ('skeleton_version', 0);
-- Checkpoints of each account's state: every transfer up to meta.checkpoint_seq is reflected
-- here; recovery replays the ones after it. `skeleton` finds names that look alike.
CREATE TABLE accounts (
    id             BIGINT PRIMARY KEY,
    name           TEXT   NOT NULL UNIQUE,
    kind           TEXT   NOT NULL,
    balance_cu     BIGINT NOT NULL,
    lots           TEXT   NOT NULL,
    stipend_period BIGINT,
    created_at_ms  BIGINT NOT NULL,
    usage          TEXT   NOT NULL DEFAULT '[]',
    skeleton       TEXT   NOT NULL DEFAULT ''
);
CREATE INDEX accounts_by_skeleton ON accounts (skeleton);
-- The log, and the truth. Appended to; never updated. `seq` is assigned by the one writer, in
-- the order the ledger decided the transfers.
CREATE TABLE transfers (
    seq               BIGINT PRIMARY KEY,
    id                BYTEA  NOT NULL,
    kind              TEXT   NOT NULL,
    debit_account     BIGINT NOT NULL,
    credit_account    BIGINT NOT NULL,
    amount_cu         BIGINT NOT NULL,
    created_at_ms     BIGINT NOT NULL,
    lot_expires_at_ms BIGINT,
    period            BIGINT
);
-- Caller-chosen ids (grants, gifts) are unique and looked up for replays; spends, the bulk of
-- the log, are indexed by nothing but their sequence number (see the SQLite store).
CREATE UNIQUE INDEX transfers_by_chosen_id ON transfers (id)
    WHERE kind IN ('grant', 'gift', 'pool_contribution');
CREATE INDEX transfers_by_debit ON transfers (debit_account, seq) WHERE kind <> 'spend';
CREATE INDEX transfers_by_credit ON transfers (credit_account, seq) WHERE kind <> 'spend';
-- API keys: the secret itself is never stored, only its SHA-256.
CREATE TABLE keys (
    id            TEXT   PRIMARY KEY,
    account_id    BIGINT NOT NULL,
    secret_sha256 BYTEA  NOT NULL,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);
CREATE INDEX keys_by_account ON keys (account_id);
"#,
    r#"
-- Escrow (several nodes on one database): a lease marks part of an account's available balance
-- as held for one node until it is spent, given back or expired. The database itself keeps the
-- sum of what leases hold within the balance, on every statement, whoever runs it.
ALTER TABLE accounts ADD COLUMN held_cu BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD CONSTRAINT leases_within_balance
    CHECK (held_cu >= 0 AND (kind NOT IN ('person', 'pool', 'agent') OR held_cu <= balance_cu));
-- The soonest lot expiry, so that "nothing is due" is a comparison in the lease statement.
ALTER TABLE accounts ADD COLUMN next_expiry_ms BIGINT;
UPDATE accounts SET next_expiry_ms = (
    SELECT MIN((lot->>'expires_at_ms')::bigint) FROM jsonb_array_elements(lots::jsonb) AS lot);
CREATE TABLE leases (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   BIGINT NOT NULL,
    node         TEXT   NOT NULL,
    remaining_cu BIGINT NOT NULL CHECK (remaining_cu >= 0),
    granted_cu   BIGINT NOT NULL,
    -- By the database's clock, so that every node's lease ends at one moment whatever its own
    -- clock says.
    expires_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX leases_by_expiry ON leases (expires_at);
CREATE INDEX leases_by_account ON leases (account_id);
-- Transfers from several writers are numbered by one sequence.
CREATE SEQUENCE transfers_seq;
SELECT setval('transfers_seq', COALESCE((SELECT MAX(seq) FROM transfers), 0) + 1, false);
"#,
    r#"
-- When a key was created or revoked, by the database's clock, so that every node's key ring can
-- follow the changes made anywhere.
ALTER TABLE keys ADD COLUMN changed_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX keys_by_change ON keys (changed_at);
"#,
    r#"
-- Each escrow settle batch leaves its mark (its first transfer's id), so that a node whose
-- commit's acknowledgement was lost with the connection can ask whether it happened.
CREATE TABLE settle_batches (
    id           BYTEA PRIMARY KEY,
    committed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX settle_batches_by_time ON settle_batches (committed_at);
"#,
    r#"
-- Agent runs' journals, each owned by the server that runs it (it reads its own back when it
-- starts again). The records are the run's person's own: deleted with the run.
CREATE TABLE agent_journal (
    owner   TEXT   NOT NULL,
    run     TEXT   NOT NULL,
    seq     BIGINT NOT NULL,
    record  BYTEA  NOT NULL,
    PRIMARY KEY (run, seq)
);
CREATE INDEX agent_journal_by_owner ON agent_journal (owner, run, seq);
"#,
    r#"
CREATE TABLE model_access (
    model    TEXT PRIMARY KEY,
    accounts TEXT NOT NULL,
    groups   TEXT NOT NULL
);
CREATE TABLE group_members (
    group_name TEXT   NOT NULL,
    account_id BIGINT NOT NULL,
    PRIMARY KEY (group_name, account_id)
);
INSERT INTO meta (key, value) VALUES ('access_version', 0);
"#,
    r#"
ALTER TABLE keys ADD COLUMN cap_cu BIGINT;
ALTER TABLE keys ADD COLUMN cap_period BIGINT;
ALTER TABLE keys ADD COLUMN cap_spent_cu BIGINT NOT NULL DEFAULT 0;
"#,
    r#"
ALTER TABLE keys ADD COLUMN name TEXT;
"#,
    r#"
CREATE TABLE operator_actions (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms      BIGINT NOT NULL,
    actor      TEXT   NOT NULL,
    action     TEXT   NOT NULL,
    account_id BIGINT,
    object     TEXT,
    amount_cu  BIGINT
);
"#,
    r#"
CREATE TABLE reports (
    period_start_ms BIGINT           PRIMARY KEY,
    epsilon         DOUBLE PRECISION NOT NULL,
    made_at_ms      BIGINT           NOT NULL,
    body            TEXT             NOT NULL
);
"#,
];

/// The advisory lock the writer holds for the store's lifetime ("STIPEND" and 1).
const WRITER_LOCK: i64 = 0x5354_4950_454E_4401;
/// The advisory lock migrations run under, so that nodes starting together migrate once.
const MIGRATION_LOCK: i64 = 0x5354_4950_454E_4402;

/// How many idle read connections are kept.
const READERS_IDLE_MAX: usize = 8;
/// The longest a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const ACCOUNT_COLUMNS: &str =
    "id, name, kind, balance_cu, lots, stipend_period, created_at_ms, usage";
const TRANSFER_COLUMNS: &str =
    "id, kind, debit_account, credit_account, amount_cu, created_at_ms, lot_expires_at_ms, period";
const KEY_COLUMNS: &str = "id, account_id, secret_sha256, created_at_ms, revoked_at_ms, name";
/// What a key's read is: its columns and its cap's.
const KEY_SELECT: &str = "id, account_id, secret_sha256, created_at_ms, revoked_at_ms, cap_cu, \
     cap_period, cap_spent_cu, name";

fn io(error: impl std::fmt::Display) -> StoreError {
    StoreError::Io(error.to_string())
}

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
}

/// A driver error, with the server's own message when it sent one.
fn pg(error: tokio_postgres::Error) -> StoreError {
    if let Some(db) = error.as_db_error() {
        return StoreError::Io(format!("PostgreSQL: {}", db.message()));
    }
    // The driver's own message is often only the step that failed ("error performing TLS
    // handshake"); its causes say why ("invalid peer certificate: UnknownIssuer").
    let mut message = format!("PostgreSQL: {error}");
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    StoreError::Io(message)
}

/// A future that runs on the store's runtime.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A read: given a connection for its duration, it returns a future of its result.
trait ReadFn<T>:
    for<'a> FnOnce(&'a mut Client) -> BoxFuture<'a, Result<T, StoreError>> + Send + 'static
{
}

impl<T, F> ReadFn<T> for F where
    F: for<'a> FnOnce(&'a mut Client) -> BoxFuture<'a, Result<T, StoreError>> + Send + 'static
{
}

/// Connections to one database: how to open one, and the idle ones.
struct Pool {
    target: Target,
    idle: Mutex<Vec<Client>>,
}

impl Pool {
    /// Opens a new connection (not from the pool).
    async fn connect(&self) -> Result<Client, StoreError> {
        let Target { config, tls } = &self.target;
        match tls {
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(pg)?;
                tokio::spawn(drive(connection));
                Ok(client)
            }
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await.map_err(pg)?;
                tokio::spawn(drive(connection));
                Ok(client)
            }
        }
    }

    async fn get(&self) -> Result<Client, StoreError> {
        while let Some(client) = self.idle.lock().pop() {
            if !client.is_closed() {
                return Ok(client);
            }
        }
        self.connect().await
    }

    /// Returns a connection after a read that succeeded; one that failed is dropped instead, so
    /// that a broken connection is never handed out again.
    fn put(&self, client: Client) {
        let mut idle = self.idle.lock();
        if !client.is_closed() && idle.len() < READERS_IDLE_MAX {
            idle.push(client);
        }
    }

    /// Runs `read` on a pooled connection.
    async fn read<T>(&self, read: impl ReadFn<T>) -> Result<T, StoreError> {
        let mut client = self.get().await?;
        let result = read(&mut client).await;
        if result.is_ok() {
            self.put(client);
        }
        result
    }
}

/// The writer's connection, which holds the store's advisory lock.
struct Writer {
    client: Client,
}

/// The PostgreSQL store.
pub struct PostgresStore {
    /// Drives the connections; `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    pool: Arc<Pool>,
    /// The writer; `None` for a read-only store.
    writer: Option<Arc<tokio::sync::Mutex<Writer>>>,
    /// The database, for messages (without its password).
    description: String,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        // Give the claim back at once, so that a process reopening the store right after does not
        // find it still held by a connection that is only closing.
        if let Some(writer) = self.writer.take() {
            let _ = self.run(async move {
                let writer = writer.lock().await;
                let unlock = writer
                    .client
                    .execute("SELECT pg_advisory_unlock_all()", &[]);
                let _ = tokio::time::timeout(Duration::from_secs(1), unlock).await;
                Ok(())
            });
        }
        // Dropping a runtime waits for its threads, which is not allowed inside another runtime;
        // the store may be dropped there, so it is shut down in the background.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Checks a `database_url` without connecting, and says which database it names (without its
/// password), for the config's checks and messages.
pub fn check_url(url: &str) -> Result<String, String> {
    parse_url(url)
        .map(|target| target.describe())
        .map_err(|error| match error {
            StoreError::Io(message) => message,
            other => other.to_string(),
        })
}

/// Where the database is and how to reach it.
struct Target {
    config: Config,
    /// `None`: plain TCP (`sslmode=disable`, or none given).
    tls: Option<tls::Rustls>,
}

impl Target {
    fn describe(&self) -> String {
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let tls = match (&self.tls, self.config.get_ssl_mode()) {
            (None, _) => "",
            (Some(_), tokio_postgres::config::SslMode::Prefer) => {
                ", over TLS if the server offers it"
            }
            (Some(_), _) => ", over TLS",
        };
        format!(
            "database {} on {}{tls}",
            self.config.get_dbname().unwrap_or("(default)"),
            hosts.join(",")
        )
    }
}

async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::warn!(%error, "a PostgreSQL connection ended");
    }
}

/// Reads a `database_url`. Its libpq-style `sslmode` and `sslrootcert` are taken here:
/// `disable` (or none) is plain TCP, for loopback or a private network; `prefer` is TLS when the
/// server offers it; `require`, `verify-ca` and `verify-full` are TLS or nothing. Whenever TLS is
/// used the server's certificate is verified, chain and host name, against the platform's trust
/// store and the PEM file `sslrootcert` names.
fn parse_url(url: &str) -> Result<Target, StoreError> {
    use tokio_postgres::config::SslMode;
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(io(
            "database_url must be a postgres:// URL (postgres://user@host:port/database)",
        ));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let mut mode = None;
    let mut root_file = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => mode = Some(percent_decoded(value)?),
            "sslrootcert" => root_file = Some(std::path::PathBuf::from(percent_decoded(value)?)),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config: Config = rest.parse().map_err(|error| {
        io(format!(
            "database_url is not a valid PostgreSQL URL: {error}"
        ))
    })?;
    let ssl_mode = match mode.as_deref() {
        None | Some("disable" | "allow") => SslMode::Disable,
        Some("prefer") => SslMode::Prefer,
        Some("require" | "verify-ca" | "verify-full") => SslMode::Require,
        Some(other) => {
            return Err(io(format!(
                "database_url: sslmode {other:?} is not one of disable, prefer, require, \
                 verify-ca, verify-full"
            )));
        }
    };
    if ssl_mode == SslMode::Disable && root_file.is_some() {
        return Err(io(
            "database_url names an sslrootcert but no sslmode: add sslmode=verify-full",
        ));
    }
    config.ssl_mode(ssl_mode);
    let tls = match ssl_mode {
        SslMode::Disable => None,
        _ => Some(
            tls::Rustls::new(root_file.as_deref())
                .map_err(|error| io(format!("database_url: {error}")))?,
        ),
    };
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.application_name("stipend");
    Ok(Target { config, tls })
}

/// A URL query value with its `%XX` escapes decoded.
fn percent_decoded(value: &str) -> Result<String, StoreError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = value
                .get(index + 1..index + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| io(format!("database_url: {value:?} has a bad % escape")))?;
            out.push(hex);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).map_err(|_| io(format!("database_url: {value:?} is not UTF-8")))
}

impl PostgresStore {
    /// Connects to the database at `url` for writing: migrates it (once, under a lock, however
    /// many nodes start together) and claims it. Fails with [`StoreError::Locked`] if another
    /// process has it open for writing.
    pub fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let mut store = PostgresStore::connect(url)?;
        let pool = Arc::clone(&store.pool);
        let description = store.description.clone();
        let writer = store.run(async move {
            let mut client = pool.connect().await?;
            migrate(&mut client).await?;
            let claimed: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK])
                .await
                .map_err(pg)?
                .get(0);
            if !claimed {
                return Err(StoreError::Locked { path: description });
            }
            let shared = client
                .query_opt("SELECT 1 FROM meta WHERE key = 'shared'", &[])
                .await
                .map_err(pg)?;
            if shared.is_some() {
                return Err(StoreError::Io(
                    "this database is shared by escrow nodes: a single writer's engine may not \
                     run on it"
                        .to_string(),
                ));
            }
            refresh_skeletons(&mut client).await?;
            Ok(Writer { client })
        })?;
        store.writer = Some(Arc::new(tokio::sync::Mutex::new(writer)));
        Ok(store)
    }

    /// Connects for reading only, without claiming: audits and listings while a server holds
    /// the store. The database must have been set up by a writer.
    pub fn open_read_only(url: &str) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore::connect(url)?;
        let pool = Arc::clone(&store.pool);
        store.run(async move {
            pool.read(move |client| {
                Box::pin(async move {
                    let version = schema_version(client).await?;
                    check_version(version)?;
                    if version == 0 {
                        return Err(io(
                            "the database has no Stipend store yet (run a server once)",
                        ));
                    }
                    Ok(())
                })
            })
            .await
        })?;
        Ok(store)
    }

    /// Whether a process holds the store at `url` for writing right now.
    pub fn is_locked(url: &str) -> Result<bool, StoreError> {
        let store = PostgresStore::connect(url)?;
        let pool = Arc::clone(&store.pool);
        store.run(async move {
            let client = pool.connect().await?;
            let free: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK])
                .await
                .map_err(pg)?
                .get(0);
            // The connection closes when it is dropped, and its lock with it.
            Ok(!free)
        })
    }

    fn connect(url: &str) -> Result<PostgresStore, StoreError> {
        let target = parse_url(url)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("store-postgres")
            .enable_all()
            .build()
            .map_err(|error| io(format!("cannot start the store's runtime: {error}")))?;
        Ok(PostgresStore {
            runtime: Some(runtime),
            description: target.describe(),
            pool: Arc::new(Pool {
                target,
                idle: Mutex::new(Vec::new()),
            }),
            writer: None,
        })
    }

    /// The database, for messages.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Runs `work` on the store's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(
        &self,
        work: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| io("the store is closing"))?;
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = sender.send(work.await);
        });
        receiver
            .recv()
            .map_err(|_| io("the store's connection task stopped"))?
    }

    /// Runs `read` on a pooled connection, on the store's runtime.
    fn read<T: Send + 'static>(&self, read: impl ReadFn<T>) -> Result<T, StoreError> {
        let pool = Arc::clone(&self.pool);
        self.run(async move { pool.read(read).await })
    }

    fn writer(&self) -> Result<Arc<tokio::sync::Mutex<Writer>>, StoreError> {
        self.writer
            .clone()
            .ok_or_else(|| io("this store was opened read-only"))
    }
}

async fn schema_version(client: &Client) -> Result<i64, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('stipend_schema') IS NOT NULL", &[])
        .await
        .map_err(pg)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one("SELECT version FROM stipend_schema", &[])
        .await
        .map_err(pg)?
        .get(0))
}

fn check_version(version: i64) -> Result<(), StoreError> {
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported,
        });
    }
    Ok(())
}

/// Applies the migrations not yet applied, in one transaction under an advisory lock: a second
/// node starting at the same moment waits, then finds nothing to do.
async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let transaction = client.transaction().await.map_err(pg)?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    transaction
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS stipend_schema (version BIGINT NOT NULL);
             INSERT INTO stipend_schema (version)
                 SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM stipend_schema);",
        )
        .await
        .map_err(pg)?;
    let version: i64 = transaction
        .query_one("SELECT version FROM stipend_schema", &[])
        .await
        .map_err(pg)?
        .get(0);
    check_version(version)?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        transaction.batch_execute(migration).await.map_err(pg)?;
        transaction
            .execute(
                "UPDATE stipend_schema SET version = $1",
                &[&(index as i64 + 1)],
            )
            .await
            .map_err(pg)?;
        tracing::info!(version = index + 1, "store migrated");
    }
    transaction.commit().await.map_err(pg)
}

/// Remakes every account's name skeleton if they were made by another rule or other Unicode
/// tables than this binary's (as the SQLite store does).
async fn refresh_skeletons(client: &mut Client) -> Result<(), StoreError> {
    let transaction = client.transaction().await.map_err(pg)?;
    let version: i64 = transaction
        .query_one(
            "SELECT value FROM meta WHERE key = 'skeleton_version' FOR UPDATE",
            &[],
        )
        .await
        .map_err(pg)?
        .get(0);
    if version == ACCOUNT_NAME_SKELETON_VERSION {
        return Ok(());
    }
    let rows = transaction
        .query("SELECT id, name FROM accounts", &[])
        .await
        .map_err(pg)?;
    let ids: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
    let skeletons: Vec<String> = rows
        .iter()
        .map(|row| account_name_skeleton(row.get(1)))
        .collect();
    transaction
        .execute(
            "UPDATE accounts AS a SET skeleton = u.skeleton
             FROM UNNEST($1::bigint[], $2::text[]) AS u(id, skeleton) WHERE a.id = u.id",
            &[&ids, &skeletons],
        )
        .await
        .map_err(pg)?;
    transaction
        .execute(
            "UPDATE meta SET value = $1 WHERE key = 'skeleton_version'",
            &[&ACCOUNT_NAME_SKELETON_VERSION],
        )
        .await
        .map_err(pg)?;
    transaction.commit().await.map_err(pg)?;
    tracing::info!(n_accounts = ids.len(), "account name skeletons made anew");
    Ok(())
}

fn account_from_row(row: &Row) -> Result<AccountRecord, StoreError> {
    let id: i64 = row.try_get(0).map_err(pg)?;
    let kind: &str = row.try_get(2).map_err(pg)?;
    let lots: &str = row.try_get(4).map_err(pg)?;
    let usage: &str = row.try_get(7).map_err(pg)?;
    Ok(AccountRecord {
        id: AccountId(id as u64),
        name: row.try_get(1).map_err(pg)?,
        kind: AccountKind::parse(kind)
            .ok_or_else(|| corrupt(format!("account {id}: unknown kind {kind:?}")))?,
        balance_cu: row.try_get(3).map_err(pg)?,
        lots: lots_from_json(lots)
            .map_err(|error| corrupt(format!("account {id}: lots do not decode: {error}")))?,
        stipend_period: row.try_get(5).map_err(pg)?,
        usage: usage_from_json(usage)
            .map_err(|error| corrupt(format!("account {id}: usage does not decode: {error}")))?,
        created_at_ms: row.try_get(6).map_err(pg)?,
    })
}

fn transfer_from_row(row: &Row) -> Result<Transfer, StoreError> {
    let id: &[u8] = row.try_get(0).map_err(pg)?;
    let bytes: [u8; 16] = id
        .try_into()
        .map_err(|_| corrupt("a transfer id is not 16 bytes"))?;
    let id = TransferId(u128::from_be_bytes(bytes));
    let kind: &str = row.try_get(1).map_err(pg)?;
    let amount_cu: i64 = row.try_get(4).map_err(pg)?;
    Ok(Transfer {
        id,
        kind: TransferKind::parse(kind)
            .ok_or_else(|| corrupt(format!("transfer {id}: unknown kind {kind:?}")))?,
        debit: AccountId(row.try_get::<_, i64>(2).map_err(pg)? as u64),
        credit: AccountId(row.try_get::<_, i64>(3).map_err(pg)? as u64),
        amount_cu: u64::try_from(amount_cu)
            .map_err(|_| corrupt(format!("transfer {id}: negative amount")))?,
        created_at_ms: row.try_get(5).map_err(pg)?,
        lot_expires_at_ms: row.try_get(6).map_err(pg)?,
        period: row.try_get(7).map_err(pg)?,
    })
}

fn key_from_row(row: &Row) -> Result<KeyRecord, StoreError> {
    let id: String = row.try_get(0).map_err(pg)?;
    let hash: &[u8] = row.try_get(2).map_err(pg)?;
    Ok(KeyRecord {
        secret_sha256: hash
            .try_into()
            .map_err(|_| corrupt(format!("key {id}: the hash is not 32 bytes")))?,
        account: AccountId(row.try_get::<_, i64>(1).map_err(pg)? as u64),
        created_at_ms: row.try_get(3).map_err(pg)?,
        revoked_at_ms: row.try_get(4).map_err(pg)?,
        cap: row
            .try_get::<_, Option<i64>>(5)
            .map_err(pg)?
            .map(|cap_cu| -> Result<KeyCap, StoreError> {
                Ok(KeyCap {
                    cap_cu: cap_cu.max(0) as u64,
                    period: row
                        .try_get::<_, Option<i64>>(6)
                        .map_err(pg)?
                        .unwrap_or(i64::MIN),
                    spent_cu: row.try_get::<_, i64>(7).map_err(pg)?.max(0) as u64,
                })
            })
            .transpose()?,
        name: row.try_get(8).map_err(pg)?,
        id,
    })
}

fn accounts_from(rows: &[Row]) -> Result<Vec<AccountRecord>, StoreError> {
    rows.iter().map(account_from_row).collect()
}

fn transfers_from(rows: &[Row]) -> Result<Vec<Transfer>, StoreError> {
    rows.iter().map(transfer_from_row).collect()
}

/// The transfers after the checkpoint, in order, read inside `client`'s transaction.
async fn tail(
    client: &impl tokio_postgres::GenericClient,
    checkpoint: i64,
) -> Result<Vec<Transfer>, StoreError> {
    let rows = client
        .query(
            &format!("SELECT {TRANSFER_COLUMNS} FROM transfers WHERE seq > $1 ORDER BY seq"),
            &[&checkpoint],
        )
        .await
        .map_err(pg)?;
    transfers_from(&rows)
}

async fn checkpoint_seq(client: &impl tokio_postgres::GenericClient) -> Result<i64, StoreError> {
    Ok(client
        .query_one("SELECT value FROM meta WHERE key = 'checkpoint_seq'", &[])
        .await
        .map_err(pg)?
        .get(0))
}

/// What the audit reads from one snapshot.
struct Audited {
    accounts: Vec<AuditRow>,
    tail: Vec<Transfer>,
    audit: TransferAudit,
}

async fn audit_in_snapshot(client: &mut Client) -> Result<Audited, StoreError> {
    let transaction = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(pg)?;
    let checkpoint = checkpoint_seq(&transaction).await?;
    // Sums are NUMERIC in PostgreSQL; they travel as text and are read exactly.
    let rows = transaction
        .query(
            &format!(
                "WITH credits AS (
                     SELECT credit_account AS account_id, SUM(amount_cu) AS total
                     FROM transfers WHERE seq <= $1 GROUP BY credit_account),
                 debits AS (
                     SELECT debit_account AS account_id, SUM(amount_cu) AS total
                     FROM transfers WHERE seq <= $1 GROUP BY debit_account)
                 SELECT {ACCOUNT_COLUMNS},
                        COALESCE(credits.total, 0)::text, COALESCE(debits.total, 0)::text
                 FROM accounts
                 LEFT JOIN credits ON credits.account_id = accounts.id
                 LEFT JOIN debits ON debits.account_id = accounts.id
                 ORDER BY accounts.id"
            ),
            &[&checkpoint],
        )
        .await
        .map_err(pg)?;
    let mut accounts = Vec::with_capacity(rows.len());
    for row in &rows {
        let sum = |index: usize| -> Result<i128, StoreError> {
            let text: &str = row.try_get(index).map_err(pg)?;
            text.parse()
                .map_err(|_| corrupt(format!("a sum of transfers is not an integer: {text}")))
        };
        accounts.push(AuditRow {
            account: account_from_row(row)?,
            credits_cu: sum(8)?,
            debits_cu: sum(9)?,
        });
    }
    let tail = tail(&transaction, checkpoint).await?;
    let counts = transaction
        .query_one(
            "SELECT COUNT(*),
                    COUNT(*) FILTER (WHERE amount_cu <= 0),
                    COUNT(*) FILTER (WHERE debit_account = credit_account),
                    COUNT(*) FILTER (WHERE
                        NOT EXISTS (SELECT 1 FROM accounts WHERE id = debit_account)
                        OR NOT EXISTS (SELECT 1 FROM accounts WHERE id = credit_account))
             FROM transfers",
            &[],
        )
        .await
        .map_err(pg)?;
    let count = |index: usize| -> Result<u64, StoreError> {
        Ok(counts.try_get::<_, i64>(index).map_err(pg)? as u64)
    };
    let audit = TransferAudit {
        checkpoint_seq: checkpoint,
        n_transfers: count(0)?,
        n_amount_not_positive: count(1)?,
        n_self: count(2)?,
        n_unknown_account: count(3)?,
    };
    transaction.commit().await.map_err(pg)?;
    Ok(Audited {
        accounts,
        tail,
        audit,
    })
}

/// Writes one batch in one transaction: new accounts, new transfers (numbered in order from the
/// transfers' sequence), and the checkpoint.
async fn commit(writer: &mut Writer, batch: Batch) -> Result<(), StoreError> {
    let transaction = writer.client.transaction().await.map_err(pg)?;
    if !batch.created.is_empty() {
        let mut ids = Vec::new();
        let mut names = Vec::new();
        let mut kinds = Vec::new();
        let mut balances = Vec::new();
        let mut lots = Vec::new();
        let mut periods = Vec::new();
        let mut created = Vec::new();
        let mut usages = Vec::new();
        let mut skeletons = Vec::new();
        let mut expiries = Vec::new();
        for record in &batch.created {
            expiries.push(stipend_ledger::escrow::next_expiry_ms(&record.lots));
            ids.push(record.id.0 as i64);
            skeletons.push(account_name_skeleton(&record.name));
            names.push(record.name.clone());
            kinds.push(record.kind.as_str());
            balances.push(record.balance_cu);
            lots.push(lots_json(&record.lots)?);
            periods.push(record.stipend_period);
            created.push(record.created_at_ms);
            usages.push(usage_json(&record.usage)?);
        }
        transaction
            .execute(
                &format!(
                    "INSERT INTO accounts ({ACCOUNT_COLUMNS}, skeleton, next_expiry_ms)
                     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[],
                                          $5::text[], $6::bigint[], $7::bigint[], $8::text[],
                                          $9::text[], $10::bigint[])"
                ),
                &[
                    &ids, &names, &kinds, &balances, &lots, &periods, &created, &usages,
                    &skeletons, &expiries,
                ],
            )
            .await
            .map_err(pg)?;
    }
    let seq_last = match escrow::append(&transaction, &batch.transfers).await? {
        Some(seq) => seq,
        None => transaction
            .query_one("SELECT COALESCE(MAX(seq), 0) FROM transfers", &[])
            .await
            .map_err(pg)?
            .get(0),
    };
    if let Some(updates) = &batch.checkpoint {
        let mut ids = Vec::with_capacity(updates.len());
        let mut balances = Vec::with_capacity(updates.len());
        let mut lots = Vec::with_capacity(updates.len());
        let mut periods = Vec::with_capacity(updates.len());
        let mut usages = Vec::with_capacity(updates.len());
        let mut expiries = Vec::with_capacity(updates.len());
        let mut kinds = Vec::with_capacity(updates.len());
        for update in updates {
            kinds.push(update.kind.as_str());
            expiries.push(stipend_ledger::escrow::next_expiry_ms(&update.lots));
            ids.push(update.id.0 as i64);
            balances.push(update.balance_cu);
            lots.push(lots_json(&update.lots)?);
            periods.push(update.stipend_period);
            usages.push(usage_json(&update.usage)?);
        }
        let changed = transaction
            .execute(
                "UPDATE accounts AS a
                 SET balance_cu = u.balance_cu, lots = u.lots,
                     stipend_period = u.stipend_period, usage = u.usage,
                     next_expiry_ms = u.next_expiry_ms, kind = u.kind
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::text[],
                             $6::bigint[], $7::text[])
                     AS u(id, balance_cu, lots, stipend_period, usage, next_expiry_ms, kind)
                 WHERE a.id = u.id",
                &[&ids, &balances, &lots, &periods, &usages, &expiries, &kinds],
            )
            .await
            .map_err(pg)?;
        if changed != updates.len() as u64 {
            return Err(corrupt(format!(
                "a checkpoint updated {changed} of {} accounts",
                updates.len()
            )));
        }
        transaction
            .execute(
                "UPDATE meta SET value = $1 WHERE key = 'checkpoint_seq'",
                &[&seq_last],
            )
            .await
            .map_err(pg)?;
    }
    transaction.commit().await.map_err(pg)
}

impl Store for PostgresStore {
    fn account(&self, id: AccountId) -> Result<Option<AccountRecord>, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = $1"),
                        &[&(id.0 as i64)],
                    )
                    .await
                    .map_err(pg)?;
                Ok(accounts_from(&rows)?.pop())
            })
        })
    }

    fn account_by_name(&self, name: &str) -> Result<Option<AccountRecord>, StoreError> {
        let name = name.to_string();
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = $1"),
                        &[&name],
                    )
                    .await
                    .map_err(pg)?;
                Ok(accounts_from(&rows)?.pop())
            })
        })
    }

    fn account_by_skeleton(&self, skeleton: &str) -> Result<Option<AccountRecord>, StoreError> {
        let skeleton = skeleton.to_string();
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE skeleton = $1
                         ORDER BY id LIMIT 1"
                        ),
                        &[&skeleton],
                    )
                    .await
                    .map_err(pg)?;
                Ok(accounts_from(&rows)?.pop())
            })
        })
    }

    fn accounts(
        &self,
        after: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        let after = after.map_or(0, |id| id.0 as i64);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                .query(
                    &format!(
                        "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id > $1 ORDER BY id LIMIT $2"
                    ),
                    &[&after, &limit],
                )
                .await
                .map_err(pg)?;
                accounts_from(&rows)
            })
        })
    }

    fn account_id_max(&self) -> Result<Option<AccountId>, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let max: Option<i64> = client
                    .query_one("SELECT MAX(id) FROM accounts", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                Ok(max.map(|id| AccountId(id as u64)))
            })
        })
    }

    fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, StoreError> {
        let bytes = id.0.to_be_bytes().to_vec();
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {TRANSFER_COLUMNS} FROM transfers
                         WHERE id = $1 AND kind IN ('grant', 'gift', 'pool_contribution')"
                        ),
                        &[&bytes],
                    )
                    .await
                    .map_err(pg)?;
                Ok(transfers_from(&rows)?.pop())
            })
        })
    }

    fn all_transfers_of(&self, account: AccountId) -> Result<Vec<Transfer>, StoreError> {
        let account = account.0 as i64;
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {TRANSFER_COLUMNS} FROM transfers
                             WHERE debit_account = $1 OR credit_account = $1 ORDER BY seq"
                        ),
                        &[&account],
                    )
                    .await
                    .map_err(pg)?;
                transfers_from(&rows)
            })
        })
    }

    fn transfers_of(&self, account: AccountId, limit: usize) -> Result<Vec<Transfer>, StoreError> {
        let account = account.0 as i64;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {TRANSFER_COLUMNS} FROM (
                            SELECT seq, {TRANSFER_COLUMNS} FROM transfers
                            WHERE debit_account = $1 AND kind <> 'spend'
                            UNION ALL
                            SELECT seq, {TRANSFER_COLUMNS} FROM transfers
                            WHERE credit_account = $1 AND kind <> 'spend'
                         ) AS mine ORDER BY seq DESC LIMIT $2"
                        ),
                        &[&account, &limit],
                    )
                    .await
                    .map_err(pg)?;
                transfers_from(&rows)
            })
        })
    }

    fn checkpoint_seq(&self) -> Result<i64, StoreError> {
        self.read(|client| Box::pin(checkpoint_seq(&*client)))
    }

    fn transfers_after_checkpoint(
        &self,
        visit: &mut dyn FnMut(Transfer),
    ) -> Result<(), StoreError> {
        let transfers = self.read(move |client| {
            Box::pin(async move {
                let transaction = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(pg)?;
                let checkpoint = checkpoint_seq(&transaction).await?;
                let transfers = tail(&transaction, checkpoint).await?;
                transaction.commit().await.map_err(pg)?;
                Ok(transfers)
            })
        })?;
        transfers.into_iter().for_each(visit);
        Ok(())
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let writer = self.writer()?;
        let batch = batch.clone();
        self.run(async move {
            let mut writer = writer.lock().await;
            commit(&mut writer, batch).await
        })
    }

    fn probe_write(&self) -> Result<(), StoreError> {
        let writer = self.writer()?;
        let pool = Arc::clone(&self.pool);
        let description = self.description.clone();
        self.run(async move {
            let mut writer = writer.lock().await;
            if writer.client.is_closed() {
                // The database went away (a restart, a lost network): claim it again on a new
                // connection, unless another process took it meanwhile.
                let client = pool.connect().await?;
                let claimed: bool = client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK])
                    .await
                    .map_err(pg)?
                    .get(0);
                if !claimed {
                    return Err(StoreError::Locked { path: description });
                }
                writer.client = client;
                tracing::info!("reconnected to the database and claimed it again");
            }
            writer
                .client
                .execute(
                    "UPDATE meta SET value = value WHERE key = 'checkpoint_seq'",
                    &[],
                )
                .await
                .map_err(pg)?;
            Ok(())
        })
    }

    fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        // On a database shared by nodes there is no writer: any connection will do.
        let key = key.clone();
        self.read(move |client| {
            Box::pin(async move {
                client
                    .execute(
                        &format!(
                            "INSERT INTO keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                        ),
                        &[
                            &key.id,
                            &(key.account.0 as i64),
                            &key.secret_sha256.as_slice(),
                            &key.created_at_ms,
                            &key.revoked_at_ms,
                            &key.name,
                        ],
                    )
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
    }

    fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.read(move |client| {
            Box::pin(async move {
                let changed = client
                    .execute(
                        "UPDATE keys SET revoked_at_ms = COALESCE(revoked_at_ms, $2), changed_at = now()
                         WHERE id = $1",
                        &[&id, &at_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(changed == 1)
            })
        })
    }

    fn accounts_named_like(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(AccountId, String)>, StoreError> {
        let prefix = prefix.to_string();
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT id, name FROM accounts WHERE starts_with(name, $1)
                         ORDER BY name COLLATE \"C\" LIMIT $2",
                        &[&prefix, &limit],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|row| (AccountId(row.get::<_, i64>(0) as u64), row.get(1)))
                    .collect())
            })
        })
    }

    fn journal_starts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query("SELECT run, record FROM agent_journal WHERE seq = 0", &[])
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
            })
        })
    }

    fn journal_of(&self, run: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let run = run.to_string();
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT record FROM agent_journal WHERE run = $1 ORDER BY seq",
                        &[&run],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|row| row.get(0)).collect())
            })
        })
    }

    fn journal_erase(&self, run: &str) -> Result<(), StoreError> {
        let run = run.to_string();
        self.read(move |client| {
            Box::pin(async move {
                client
                    .execute("DELETE FROM agent_journal WHERE run = $1", &[&run])
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
    }

    fn erase_names(&self, id: AccountId, anonymous_name: &str) -> Result<(), StoreError> {
        let name = anonymous_name.to_string();
        let skeleton = account_name_skeleton(anonymous_name);
        self.read(move |client| {
            Box::pin(async move {
                let transaction = client.transaction().await.map_err(pg)?;
                let changed = transaction
                    .execute(
                        "UPDATE accounts SET name = $2, skeleton = $3 WHERE id = $1",
                        &[&(id.0 as i64), &name, &skeleton],
                    )
                    .await
                    .map_err(pg)?;
                if changed != 1 {
                    return Err(StoreError::Io(format!("no account {id} to rename")));
                }
                transaction
                    .execute(
                        "UPDATE keys SET name = NULL WHERE account_id = $1",
                        &[&(id.0 as i64)],
                    )
                    .await
                    .map_err(pg)?;
                transaction.commit().await.map_err(pg)
            })
        })
    }

    fn report(&self, period_start_ms: i64) -> Result<Option<String>, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let row = client
                    .query_opt(
                        "SELECT body FROM reports WHERE period_start_ms = $1",
                        &[&period_start_ms],
                    )
                    .await
                    .map_err(pg)?;
                Ok(row.map(|row| row.get(0)))
            })
        })
    }

    fn keep_report(&self, report: &KeptReport) -> Result<String, StoreError> {
        let report = report.clone();
        self.read(move |client| {
            Box::pin(async move {
                // Of two servers racing, the second's insert does nothing and it reads the first's
                // row; if that row was written after this statement's snapshot, it reads again.
                let kept = client
                    .query_opt(
                        "WITH kept AS (
                             INSERT INTO reports (period_start_ms, epsilon, made_at_ms, body)
                             VALUES ($1, $2, $3, $4)
                             ON CONFLICT (period_start_ms) DO NOTHING
                             RETURNING body)
                         SELECT body FROM kept
                         UNION ALL
                         SELECT body FROM reports WHERE period_start_ms = $1
                         LIMIT 1",
                        &[
                            &report.period_start_ms,
                            &report.epsilon,
                            &report.made_at_ms,
                            &report.body,
                        ],
                    )
                    .await
                    .map_err(pg)?;
                let row = match kept {
                    Some(row) => row,
                    None => client
                        .query_one(
                            "SELECT body FROM reports WHERE period_start_ms = $1",
                            &[&report.period_start_ms],
                        )
                        .await
                        .map_err(pg)?,
                };
                Ok(row.get(0))
            })
        })
    }

    fn reports(&self) -> Result<Vec<(i64, f64)>, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT period_start_ms, epsilon FROM reports ORDER BY period_start_ms",
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
            })
        })
    }

    fn record_action(&self, action: &OperatorAction) -> Result<(), StoreError> {
        let action = action.clone();
        self.read(move |client| {
            Box::pin(async move {
                client
                    .execute(
                        "INSERT INTO operator_actions
                             (at_ms, actor, action, account_id, object, amount_cu)
                         VALUES ($1, $2, $3, $4, $5, $6)",
                        &[
                            &action.at_ms,
                            &action.actor,
                            &action.action,
                            &action.account.map(|account| account.0 as i64),
                            &action.object,
                            &action.amount_cu.map(|cu| cu.min(i64::MAX as u64) as i64),
                        ],
                    )
                    .await
                    .map_err(pg)?;
                Ok(())
            })
        })
    }

    fn actions(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, OperatorAction)>, StoreError> {
        let before = before.unwrap_or(i64::MAX);
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        "SELECT seq, at_ms, actor, action, account_id, object, amount_cu
                         FROM operator_actions WHERE seq < $1 ORDER BY seq DESC LIMIT $2",
                        &[&before, &limit],
                    )
                    .await
                    .map_err(pg)?;
                Ok(rows
                    .iter()
                    .map(|row| {
                        (
                            row.get::<_, i64>(0),
                            OperatorAction {
                                at_ms: row.get(1),
                                actor: row.get(2),
                                action: row.get(3),
                                account: row
                                    .get::<_, Option<i64>>(4)
                                    .map(|id| AccountId(id as u64)),
                                object: row.get(5),
                                amount_cu: row.get::<_, Option<i64>>(6).map(|cu| cu.max(0) as u64),
                            },
                        )
                    })
                    .collect())
            })
        })
    }

    fn set_key_name(&self, id: &str, name: Option<&str>) -> Result<bool, StoreError> {
        let id = id.to_string();
        let name = name.map(str::to_string);
        self.read(move |client| {
            Box::pin(async move {
                let changed = client
                    .execute("UPDATE keys SET name = $2 WHERE id = $1", &[&id, &name])
                    .await
                    .map_err(pg)?;
                Ok(changed == 1)
            })
        })
    }

    fn set_key_cap(&self, id: &str, cap_cu: Option<u64>) -> Result<bool, StoreError> {
        let id = id.to_string();
        let cap_cu = cap_cu.map(|cap| cap.min(i64::MAX as u64) as i64);
        self.read(move |client| {
            Box::pin(async move {
                // changed_at: servers sharing the database read the key again.
                let changed = client
                    .execute(
                        "UPDATE keys SET cap_cu = $2, changed_at = now() WHERE id = $1",
                        &[&id, &cap_cu],
                    )
                    .await
                    .map_err(pg)?;
                Ok(changed == 1)
            })
        })
    }

    fn add_key_spends(&self, spends: &[KeySpend]) -> Result<Vec<u64>, StoreError> {
        let spends = spends.to_vec();
        self.read(move |client| {
            Box::pin(async move {
                let transaction = client.transaction().await.map_err(pg)?;
                let statement = transaction
                    .prepare(
                        "UPDATE keys SET
                             cap_spent_cu = CASE WHEN cap_period = $2 THEN cap_spent_cu + $3 ELSE $3 END,
                             cap_period = $2
                         WHERE id = $1 AND (cap_period IS NULL OR cap_period <= $2)
                         RETURNING cap_spent_cu",
                    )
                    .await
                    .map_err(pg)?;
                let mut totals = Vec::with_capacity(spends.len());
                for spend in &spends {
                    let spent = spend.spent_cu.min(i64::MAX as u64) as i64;
                    let rows = transaction
                        .query(&statement, &[&spend.id, &spend.period, &spent])
                        .await
                        .map_err(pg)?;
                    let total: i64 = rows.first().map_or(0, |row| row.get(0));
                    totals.push(total.max(0) as u64);
                }
                transaction.commit().await.map_err(pg)?;
                Ok(totals)
            })
        })
    }

    fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_string();
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!("SELECT {KEY_SELECT} FROM keys WHERE id = $1"),
                        &[&id],
                    )
                    .await
                    .map_err(pg)?;
                rows.first().map(key_from_row).transpose()
            })
        })
    }

    fn keys_of(&self, account: AccountId) -> Result<Vec<KeyRecord>, StoreError> {
        let account = account.0 as i64;
        self.read(move |client| {
            Box::pin(async move {
                let rows = client
                    .query(
                        &format!(
                            "SELECT {KEY_SELECT} FROM keys WHERE account_id = $1
                         ORDER BY created_at_ms, id"
                        ),
                        &[&account],
                    )
                    .await
                    .map_err(pg)?;
                rows.iter().map(key_from_row).collect()
            })
        })
    }

    fn keys_changed_since(&self, since: Option<i64>) -> Result<(Vec<String>, i64), StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                // Positions are microseconds of the database's clock. A change whose transaction
                // took its timestamp before this read but committed after it is caught by the
                // next read, which looks back a few seconds.
                let now: i64 = client
                    .query_one("SELECT (extract(epoch FROM now()) * 1e6)::bigint", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                let Some(since) = since else {
                    return Ok((Vec::new(), now));
                };
                let rows = client
                    .query(
                        "SELECT id FROM keys
                         WHERE changed_at >= to_timestamp($1::bigint::float8 / 1e6) - interval '5 seconds'",
                        &[&since],
                    )
                    .await
                    .map_err(pg)?;
                Ok((rows.iter().map(|row| row.get(0)).collect(), now))
            })
        })
    }

    fn access_rules(&self) -> Result<AccessRules, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                let transaction = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(pg)?;
                let version: i64 = transaction
                    .query_one("SELECT value FROM meta WHERE key = 'access_version'", &[])
                    .await
                    .map_err(pg)?
                    .get(0);
                let mut models = Vec::new();
                for row in transaction
                    .query(
                        "SELECT model, accounts, groups FROM model_access ORDER BY model",
                        &[],
                    )
                    .await
                    .map_err(pg)?
                {
                    let (model, accounts, groups): (String, String, String) =
                        (row.get(0), row.get(1), row.get(2));
                    models.push(model_access_from_json(model, &accounts, &groups)?);
                }
                let mut groups: Vec<(String, Vec<AccountId>)> = Vec::new();
                for row in transaction
                    .query(
                        "SELECT group_name, account_id FROM group_members
                         ORDER BY group_name, account_id",
                        &[],
                    )
                    .await
                    .map_err(pg)?
                {
                    let (group, account): (String, i64) = (row.get(0), row.get(1));
                    let account = AccountId(account as u64);
                    match groups.last_mut() {
                        Some((name, members)) if *name == group => members.push(account),
                        _ => groups.push((group, vec![account])),
                    }
                }
                transaction.commit().await.map_err(pg)?;
                Ok(AccessRules {
                    models,
                    groups,
                    version,
                })
            })
        })
    }

    fn access_version(&self) -> Result<i64, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                Ok(client
                    .query_one("SELECT value FROM meta WHERE key = 'access_version'", &[])
                    .await
                    .map_err(pg)?
                    .get(0))
            })
        })
    }

    fn set_model_access(
        &self,
        model: &str,
        accounts: &[AccountId],
        groups: &[String],
    ) -> Result<(), StoreError> {
        let model = model.to_string();
        let rule = (!accounts.is_empty() || !groups.is_empty())
            .then(|| model_access_json(accounts, groups))
            .transpose()?;
        self.read(move |client| {
            Box::pin(async move {
                let transaction = client.transaction().await.map_err(pg)?;
                match rule {
                    None => {
                        transaction
                            .execute("DELETE FROM model_access WHERE model = $1", &[&model])
                            .await
                            .map_err(pg)?;
                    }
                    Some((accounts, groups)) => {
                        transaction
                            .execute(
                                "INSERT INTO model_access (model, accounts, groups) VALUES ($1, $2, $3)
                                 ON CONFLICT (model) DO UPDATE SET accounts = excluded.accounts,
                                                                   groups = excluded.groups",
                                &[&model, &accounts, &groups],
                            )
                            .await
                            .map_err(pg)?;
                    }
                }
                transaction
                    .execute(
                        "UPDATE meta SET value = value + 1 WHERE key = 'access_version'",
                        &[],
                    )
                    .await
                    .map_err(pg)?;
                transaction.commit().await.map_err(pg)
            })
        })
    }

    fn set_group_member(
        &self,
        group: &str,
        account: AccountId,
        member: bool,
    ) -> Result<bool, StoreError> {
        let group = group.to_string();
        let account = account.0 as i64;
        self.read(move |client| {
            Box::pin(async move {
                let transaction = client.transaction().await.map_err(pg)?;
                let changed = if member {
                    transaction
                        .execute(
                            "INSERT INTO group_members (group_name, account_id) VALUES ($1, $2)
                             ON CONFLICT DO NOTHING",
                            &[&group, &account],
                        )
                        .await
                } else {
                    transaction
                        .execute(
                            "DELETE FROM group_members WHERE group_name = $1 AND account_id = $2",
                            &[&group, &account],
                        )
                        .await
                }
                .map_err(pg)?;
                if changed > 0 {
                    transaction
                        .execute(
                            "UPDATE meta SET value = value + 1 WHERE key = 'access_version'",
                            &[],
                        )
                        .await
                        .map_err(pg)?;
                }
                transaction.commit().await.map_err(pg)?;
                Ok(changed > 0)
            })
        })
    }

    fn audit(
        &self,
        visit_account: &mut dyn FnMut(AuditRow),
        visit_tail: &mut dyn FnMut(Transfer),
    ) -> Result<TransferAudit, StoreError> {
        let audited = self.read(|client| Box::pin(audit_in_snapshot(client)))?;
        audited.accounts.into_iter().for_each(visit_account);
        audited.tail.into_iter().for_each(visit_tail);
        Ok(audited.audit)
    }
}
