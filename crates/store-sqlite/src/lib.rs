//! The embedded store: SQLite in WAL mode, one file in the data directory.
//!
//! One process writes (it holds `<file>.lock`); any number read, also while it runs, because WAL
//! readers see a consistent snapshot without blocking the writer. Every commit is fsync'd
//! (`synchronous = FULL`) before it returns; the ledger's writer batches many changes into each.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use stipend_ledger::store::rows::{
    lots_from_json, lots_json, model_access_from_json, model_access_json, usage_from_json,
    usage_json,
};
use stipend_ledger::{
    ACCOUNT_NAME_SKELETON_VERSION, AccessRules, AccountId, AccountKind, AccountRecord, AuditRow,
    Batch, KeptReport, KeyCap, KeyRecord, KeySpend, OperatorAction, Store, StoreError, Transfer,
    TransferAudit, TransferId, TransferKind, account_name_skeleton,
};

/// The schema, one migration per entry; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('checkpoint_seq', 0);
-- Checkpoints of each account's state: every transfer up to meta.checkpoint_seq is reflected
-- here; recovery replays the ones after it.
CREATE TABLE accounts (
    id             INTEGER PRIMARY KEY,
    name           TEXT    NOT NULL UNIQUE,
    kind           TEXT    NOT NULL,
    balance_cu     INTEGER NOT NULL,
    lots           TEXT    NOT NULL,
    stipend_period INTEGER,
    created_at_ms  INTEGER NOT NULL
);
-- The log, and the truth. Appended to; never updated.
CREATE TABLE transfers (
    seq               INTEGER PRIMARY KEY,
    id                BLOB    NOT NULL,
    kind              TEXT    NOT NULL,
    debit_account     INTEGER NOT NULL,
    credit_account    INTEGER NOT NULL,
    amount_cu         INTEGER NOT NULL,
    created_at_ms     INTEGER NOT NULL,
    lot_expires_at_ms INTEGER,
    period            INTEGER
);
-- Caller-chosen ids (grants, gifts) must be unique and are looked up for replays. The ledger
-- makes every other id unique by construction (a random per-start prefix and a counter), so
-- indexing them too would cost every settle a B-tree insert for nothing.
CREATE UNIQUE INDEX transfers_by_chosen_id ON transfers (id)
    WHERE kind IN ('grant', 'gift', 'pool_contribution');
-- An account's history of grants, gifts, stipends and expiries. Spends, the bulk of the log,
-- stay out: indexing them by account would cost every settle a random B-tree insert.
CREATE INDEX transfers_by_debit ON transfers (debit_account, seq) WHERE kind <> 'spend';
CREATE INDEX transfers_by_credit ON transfers (credit_account, seq) WHERE kind <> 'spend';
"#,
    r#"
-- API keys: the secret itself is never stored, only its SHA-256.
CREATE TABLE keys (
    id             TEXT    PRIMARY KEY,
    account_id     INTEGER NOT NULL,
    secret_sha256  BLOB    NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    revoked_at_ms  INTEGER
);
CREATE INDEX keys_by_account ON keys (account_id);
"#,
    r#"
-- What each account spent in its latest period, per sink: counts, as JSON.
ALTER TABLE accounts ADD COLUMN usage TEXT NOT NULL DEFAULT '[]';
"#,
    r#"
-- The confusable skeleton of each name, so that a name that looks like an existing one is found
-- with one index lookup. Made in Rust (`account_name_skeleton`); `skeleton_version` says by which
-- rule and Unicode tables, and the store remakes them all when that changes.
ALTER TABLE accounts ADD COLUMN skeleton TEXT NOT NULL DEFAULT '';
CREATE INDEX accounts_by_skeleton ON accounts (skeleton);
INSERT INTO meta (key, value) VALUES ('skeleton_version', 0);
"#,
    r#"
-- Agent runs' journals: each run's records in order, written before they are acted on, read
-- back at start so that runs go on where they were; deleted with their run. The records are the
-- run's person's own (a transcript may be among them): never copied anywhere else.
CREATE TABLE agent_journal (
    run     TEXT    NOT NULL,
    seq     INTEGER NOT NULL,
    record  BLOB    NOT NULL,
    PRIMARY KEY (run, seq)
) WITHOUT ROWID;
"#,
    r#"
-- Which models are restricted, and to whom (account ids and group names, as JSON arrays); a
-- model with no row is open to everyone. Groups are named sets of accounts. `access_version`
-- counts the changes.
CREATE TABLE model_access (
    model    TEXT PRIMARY KEY,
    accounts TEXT NOT NULL,
    groups   TEXT NOT NULL
);
CREATE TABLE group_members (
    group_name TEXT    NOT NULL,
    account_id INTEGER NOT NULL,
    PRIMARY KEY (group_name, account_id)
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('access_version', 0);
"#,
    r#"
-- A key's cap: the most it may spend in a stipend period (NULL: none), and what it spent in the
-- period written down last (servers write their calls' spending about once a second).
ALTER TABLE keys ADD COLUMN cap_cu INTEGER;
ALTER TABLE keys ADD COLUMN cap_period INTEGER;
ALTER TABLE keys ADD COLUMN cap_spent_cu INTEGER NOT NULL DEFAULT 0;
"#,
    r#"
-- What a key's person calls it, if anything.
ALTER TABLE keys ADD COLUMN name TEXT;
"#,
    r#"
-- The operator log: who did what, when, to which account (by id) and how much; no content.
CREATE TABLE operator_actions (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms      INTEGER NOT NULL,
    actor      TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    account_id INTEGER,
    object     TEXT,
    amount_cu  INTEGER
);
"#,
    r#"
-- The transparency reports: one per period, made once and then published unchanged, with the
-- privacy budget each spent.
CREATE TABLE reports (
    period_start_ms INTEGER PRIMARY KEY,
    epsilon         REAL    NOT NULL,
    made_at_ms      INTEGER NOT NULL,
    body            TEXT    NOT NULL
);
"#,
];

/// Adds what keys spent, in one transaction; each key's total afterwards.
fn add_key_spends_on(
    connection: &mut Connection,
    spends: &[KeySpend],
) -> Result<Vec<u64>, StoreError> {
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(io)?;
    let mut totals = Vec::with_capacity(spends.len());
    {
        let mut statement = transaction
            .prepare_cached(
                "UPDATE keys SET
                     cap_spent_cu = CASE WHEN cap_period = ?2 THEN cap_spent_cu + ?3 ELSE ?3 END,
                     cap_period = ?2
                 WHERE id = ?1 AND (cap_period IS NULL OR cap_period <= ?2)
                 RETURNING cap_spent_cu",
            )
            .map_err(io)?;
        for spend in spends {
            let total: Option<i64> = statement
                .query_row(
                    params![
                        spend.id,
                        spend.period,
                        spend.spent_cu.min(i64::MAX as u64) as i64
                    ],
                    |row| row.get(0),
                )
                .optional()
                .map_err(io)?;
            totals.push(total.unwrap_or(0).max(0) as u64);
        }
    }
    transaction.commit().map_err(io)?;
    Ok(totals)
}

/// Runs `write` with what it frees zeroed in the file (`secure_delete`): for rows that hold a
/// name, so that no old copy of one stays behind a rewrite.
fn zeroing<T>(
    connection: &mut Connection,
    write: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    connection
        .execute_batch("PRAGMA secure_delete = ON")
        .map_err(io)?;
    let result = write(connection);
    connection
        .execute_batch("PRAGMA secure_delete = OFF")
        .map_err(io)?;
    result
}

/// How many idle read connections are kept.
const READERS_IDLE_MAX: usize = 8;

/// The writer's page cache by default: 16 MiB. The writer appends spends and rewrites the
/// accounts changed in the last second; what it rereads is recent, and a larger cache mostly holds
/// pages it will not read again (docs/benchmarks.md, "Memory under a sustained load").
pub const CACHE_BYTES_DEFAULT: u64 = 16 * 1024 * 1024;

/// How many more times a held store lock is tried before the store is called in use, and how
/// long apart (see `open_with_cache`).
const LOCK_TRIES: u32 = 10;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// How long a statement waits for a lock held by another connection.
const BUSY_TIMEOUT_MS: u64 = 5_000;

/// The SQLite store.
pub struct SqliteStore {
    path: PathBuf,
    /// The write connection; `None` for a read-only store.
    writer: Option<Mutex<Connection>>,
    readers: Mutex<Vec<Connection>>,
    /// Held for the store's lifetime: the writer's exclusive claim on the file.
    _lock: Option<File>,
}

fn read_access_version(connection: &Connection) -> Result<i64, StoreError> {
    connection
        .query_row(
            "SELECT value FROM meta WHERE key = 'access_version'",
            [],
            |row| row.get(0),
        )
        .map_err(io)
}

fn io(error: impl std::fmt::Display) -> StoreError {
    StoreError::Io(error.to_string())
}

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` for writing, with the default page cache.
    /// Fails with [`StoreError::Locked`] if another process has it open for writing.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        SqliteStore::open_with_cache(path, CACHE_BYTES_DEFAULT)
    }

    /// Opens the store for writing with a page cache of `cache_bytes` for the writer's
    /// connection: most of the server's memory under a sustained load, once it has filled.
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<SqliteStore, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)
                .map_err(|error| io(format!("cannot create {}: {error}", parent.display())))?;
        }
        let lock_path = lock_path(path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(|error| io(format!("cannot open {}: {error}", lock_path.display())))?;
        // Nobody else may read the lock file: a read-only handle is enough to flock it, which
        // would stop the server and the CLI alike.
        make_private(&lock_path)?;
        // The store holds who spent how much and the keys' hashes. SQLite creates its -wal and
        // -shm files with the database file's mode, so the database is created private first.
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(path)
            .map_err(|error| io(format!("cannot create {}: {error}", path.display())))?;
        for file in [
            path.to_path_buf(),
            sidecar(path, "-wal"),
            sidecar(path, "-shm"),
        ] {
            if file.exists() {
                make_private(&file)?;
            }
        }
        // A lock held by another process is refused at once, after a few short tries: a child
        // process forked by any thread holds a copy of every descriptor (this lock's included)
        // until it execs, which is microseconds, and must not pass for a second server.
        let mut tries = 0;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if tries < LOCK_TRIES => {
                    tries += 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(StoreError::Locked {
                        path: path.display().to_string(),
                    });
                }
                Err(TryLockError::Error(error)) => {
                    return Err(io(format!("cannot lock {}: {error}", lock_path.display())));
                }
            }
        }
        let mut connection = Connection::open(path)
            .map_err(|error| io(format!("cannot open {}: {error}", path.display())))?;
        // Checkpoints every 1000 pages (SQLite's default; it was 16384): the log stays a few MB
        // and is overwritten in place, and each checkpoint is short. Measured under the gateway
        // load run: 64 connections p99 ~19 ms → ~6 ms, 16 connections +10–20 % req/s; durable
        // settles in the ledger bench unchanged (docs/benchmarks.md).
        // A negative cache_size is in KiB.
        let cache_kib = (cache_bytes / 1024).max(1);
        connection
            .execute_batch(&format!(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = OFF;
                 PRAGMA cache_size = -{cache_kib};
                 PRAGMA wal_autocheckpoint = 1000;"
            ))
            .map_err(io)?;
        connection
            .busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
            .map_err(io)?;
        migrate(&mut connection)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Some(Mutex::new(connection)),
            readers: Mutex::new(Vec::new()),
            _lock: Some(lock),
        })
    }

    /// Opens an existing store for reading only, without claiming it: for audits and listings
    /// while a server holds it.
    pub fn open_read_only(path: &Path) -> Result<SqliteStore, StoreError> {
        if !path.exists() {
            return Err(io(format!("no store at {}", path.display())));
        }
        let store = SqliteStore {
            path: path.to_path_buf(),
            writer: None,
            readers: Mutex::new(Vec::new()),
            _lock: None,
        };
        let reader = store.reader()?;
        let version: i64 = reader
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(io)?;
        check_version(version)?;
        store.give_back(reader);
        Ok(store)
    }

    /// Whether a process holds the store at `path` for writing right now.
    pub fn is_locked(path: &Path) -> bool {
        let Ok(lock) = OpenOptions::new().write(true).open(lock_path(path)) else {
            return false;
        };
        match lock.try_lock() {
            Ok(()) => {
                // Dropping the file releases the lock we just took.
                false
            }
            Err(_) => true,
        }
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn reader(&self) -> Result<Connection, StoreError> {
        if let Some(connection) = self.readers.lock().pop() {
            return Ok(connection);
        }
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|error| io(format!("cannot open {}: {error}", self.path.display())))?;
        connection
            .busy_timeout(std::time::Duration::from_millis(BUSY_TIMEOUT_MS))
            .map_err(io)?;
        Ok(connection)
    }

    /// The write connection, or an error for a store opened read-only.
    fn writer(&self) -> Result<parking_lot::MutexGuard<'_, Connection>, StoreError> {
        self.writer
            .as_ref()
            .map(Mutex::lock)
            .ok_or_else(|| io("this store was opened read-only"))
    }

    fn give_back(&self, connection: Connection) {
        let mut readers = self.readers.lock();
        if readers.len() < READERS_IDLE_MAX {
            readers.push(connection);
        }
    }

    fn with_reader<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let connection = self.reader()?;
        let result = read(&connection);
        self.give_back(connection);
        result
    }
}

/// The mode of every file of the store: the operator's user only.
const FILE_MODE: u32 = 0o600;

/// `path` with `suffix` after its file name: SQLite's `-wal` and `-shm` beside the database.
fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Makes a file of the store readable and writable by its owner only, saying so loudly if it
/// was not (a store from before, or one a backup restored with the umask's mode).
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|error| io(format!("cannot read {}: {error}", path.display())))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{mode:o}"),
            "a store file was readable by others; made it private (0600)"
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
            .map_err(|error| io(format!("cannot make {} private: {error}", path.display())))?;
    }
    Ok(())
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".lock");
    PathBuf::from(name)
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

fn migrate(connection: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(io)?;
    check_version(version)?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let transaction = connection.transaction().map_err(io)?;
        transaction.execute_batch(migration).map_err(io)?;
        transaction
            .execute_batch(&format!("PRAGMA user_version = {}", index + 1))
            .map_err(io)?;
        transaction.commit().map_err(io)?;
        tracing::info!(version = index + 1, "store migrated");
    }
    refresh_skeletons(connection)
}

/// Remakes every account's name skeleton if they were made by another rule or other Unicode
/// tables than this binary's, so that a name is compared with the others by one rule.
fn refresh_skeletons(connection: &mut Connection) -> Result<(), StoreError> {
    let transaction = connection.transaction().map_err(io)?;
    let version: i64 = transaction
        .query_row(
            "SELECT value FROM meta WHERE key = 'skeleton_version'",
            [],
            |row| row.get(0),
        )
        .map_err(io)?;
    if version == ACCOUNT_NAME_SKELETON_VERSION {
        return Ok(());
    }
    let mut n_accounts = 0u64;
    {
        let mut select = transaction
            .prepare("SELECT id, name FROM accounts")
            .map_err(io)?;
        let mut update = transaction
            .prepare("UPDATE accounts SET skeleton = ?2 WHERE id = ?1")
            .map_err(io)?;
        let mut rows = select.query([]).map_err(io)?;
        while let Some(row) = rows.next().map_err(io)? {
            let id: i64 = row.get(0).map_err(io)?;
            let name: String = row.get(1).map_err(io)?;
            update
                .execute(params![id, account_name_skeleton(&name)])
                .map_err(io)?;
            n_accounts += 1;
        }
    }
    transaction
        .execute(
            "UPDATE meta SET value = ?1 WHERE key = 'skeleton_version'",
            [ACCOUNT_NAME_SKELETON_VERSION],
        )
        .map_err(io)?;
    transaction.commit().map_err(io)?;
    tracing::info!(n_accounts, "account name skeletons made anew");
    Ok(())
}

const ACCOUNT_COLUMNS: &str =
    "id, name, kind, balance_cu, lots, stipend_period, created_at_ms, usage";
const TRANSFER_COLUMNS: &str =
    "id, kind, debit_account, credit_account, amount_cu, created_at_ms, lot_expires_at_ms, period";

fn account_from_row(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<Result<AccountRecord, StoreError>> {
    let id: i64 = row.get(0)?;
    let name: String = row.get(1)?;
    let kind: String = row.get(2)?;
    let balance_cu: i64 = row.get(3)?;
    let lots: String = row.get(4)?;
    let stipend_period: Option<i64> = row.get(5)?;
    let created_at_ms: i64 = row.get(6)?;
    let usage: String = row.get(7)?;
    Ok((|| {
        let kind = AccountKind::parse(&kind)
            .ok_or_else(|| corrupt(format!("account {id}: unknown kind {kind:?}")))?;
        let lots = lots_from_json(&lots)
            .map_err(|error| corrupt(format!("account {id}: lots do not decode: {error}")))?;
        let usage = usage_from_json(&usage)
            .map_err(|error| corrupt(format!("account {id}: usage does not decode: {error}")))?;
        Ok(AccountRecord {
            id: AccountId(id as u64),
            name,
            kind,
            balance_cu,
            lots,
            stipend_period,
            usage,
            created_at_ms,
        })
    })())
}

fn transfer_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Transfer, StoreError>> {
    let id: Vec<u8> = row.get(0)?;
    let kind: String = row.get(1)?;
    let debit: i64 = row.get(2)?;
    let credit: i64 = row.get(3)?;
    let amount_cu: i64 = row.get(4)?;
    let created_at_ms: i64 = row.get(5)?;
    let lot_expires_at_ms: Option<i64> = row.get(6)?;
    let period: Option<i64> = row.get(7)?;
    Ok((|| {
        let bytes: [u8; 16] = id
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("a transfer id is not 16 bytes"))?;
        let id = TransferId(u128::from_be_bytes(bytes));
        let kind = TransferKind::parse(&kind)
            .ok_or_else(|| corrupt(format!("transfer {id}: unknown kind {kind:?}")))?;
        Ok(Transfer {
            id,
            kind,
            debit: AccountId(debit as u64),
            credit: AccountId(credit as u64),
            amount_cu: u64::try_from(amount_cu)
                .map_err(|_| corrupt(format!("transfer {id}: negative amount")))?,
            created_at_ms,
            lot_expires_at_ms,
            period,
        })
    })())
}

const KEY_COLUMNS: &str = "id, account_id, secret_sha256, created_at_ms, revoked_at_ms, cap_cu, \
     cap_period, cap_spent_cu, name";

fn key_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<KeyRecord, StoreError>> {
    let id: String = row.get(0)?;
    let account: i64 = row.get(1)?;
    let hash: Vec<u8> = row.get(2)?;
    let created_at_ms: i64 = row.get(3)?;
    let revoked_at_ms: Option<i64> = row.get(4)?;
    let (cap_cu, cap_period, cap_spent_cu): (Option<i64>, Option<i64>, i64) =
        (row.get(5)?, row.get(6)?, row.get(7)?);
    let name: Option<String> = row.get(8)?;
    let cap = cap_cu.map(|cap_cu| KeyCap {
        cap_cu: cap_cu.max(0) as u64,
        period: cap_period.unwrap_or(i64::MIN),
        spent_cu: cap_spent_cu.max(0) as u64,
    });
    Ok(hash
        .as_slice()
        .try_into()
        .map_err(|_| corrupt(format!("key {id}: the hash is not 32 bytes")))
        .map(|secret_sha256| KeyRecord {
            id,
            account: AccountId(account as u64),
            secret_sha256,
            created_at_ms,
            revoked_at_ms,
            cap,
            name,
        }))
}

impl Store for SqliteStore {
    fn account(&self, id: AccountId) -> Result<Option<AccountRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id = ?1"
                ))
                .map_err(io)?;
            statement
                .query_row([id.0 as i64], account_from_row)
                .optional()
                .map_err(io)?
                .transpose()
        })
    }

    fn account_by_name(&self, name: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = ?1"
                ))
                .map_err(io)?;
            statement
                .query_row([name], account_from_row)
                .optional()
                .map_err(io)?
                .transpose()
        })
    }

    fn account_by_skeleton(&self, skeleton: &str) -> Result<Option<AccountRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE skeleton = ?1 ORDER BY id LIMIT 1"
                ))
                .map_err(io)?;
            statement
                .query_row([skeleton], account_from_row)
                .optional()
                .map_err(io)?
                .transpose()
        })
    }

    fn accounts(
        &self,
        after: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE id > ?1 ORDER BY id LIMIT ?2"
                ))
                .map_err(io)?;
            let after = after.map_or(0, |id| id.0 as i64);
            let rows = statement
                .query_map(params![after, limit as i64], account_from_row)
                .map_err(io)?;
            let mut records = Vec::new();
            for row in rows {
                records.push(row.map_err(io)??);
            }
            Ok(records)
        })
    }

    fn account_id_max(&self) -> Result<Option<AccountId>, StoreError> {
        self.with_reader(|connection| {
            let max: Option<i64> = connection
                .query_row("SELECT MAX(id) FROM accounts", [], |row| row.get(0))
                .map_err(io)?;
            Ok(max.map(|id| AccountId(id as u64)))
        })
    }

    fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {TRANSFER_COLUMNS} FROM transfers
                     WHERE id = ?1 AND kind IN ('grant', 'gift', 'pool_contribution')"
                ))
                .map_err(io)?;
            statement
                .query_row([id.0.to_be_bytes().as_slice()], transfer_from_row)
                .optional()
                .map_err(io)?
                .transpose()
        })
    }

    fn all_transfers_of(&self, account: AccountId) -> Result<Vec<Transfer>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {TRANSFER_COLUMNS} FROM transfers
                     WHERE debit_account = ?1 OR credit_account = ?1 ORDER BY seq"
                ))
                .map_err(io)?;
            let rows = statement
                .query_map(params![account.0 as i64], transfer_from_row)
                .map_err(io)?;
            let mut transfers = Vec::new();
            for row in rows {
                transfers.push(row.map_err(io)??);
            }
            Ok(transfers)
        })
    }

    fn transfers_of(&self, account: AccountId, limit: usize) -> Result<Vec<Transfer>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {TRANSFER_COLUMNS} FROM (
                        SELECT seq, {TRANSFER_COLUMNS} FROM transfers
                        WHERE debit_account = ?1 AND kind <> 'spend'
                        UNION ALL
                        SELECT seq, {TRANSFER_COLUMNS} FROM transfers
                        WHERE credit_account = ?1 AND kind <> 'spend'
                     ) ORDER BY seq DESC LIMIT ?2"
                ))
                .map_err(io)?;
            let rows = statement
                .query_map(params![account.0 as i64, limit as i64], transfer_from_row)
                .map_err(io)?;
            let mut transfers = Vec::new();
            for row in rows {
                transfers.push(row.map_err(io)??);
            }
            Ok(transfers)
        })
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut connection = self.writer()?;
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(io)?;
        {
            let mut insert_account = transaction
                .prepare_cached(&format!(
                    "INSERT INTO accounts ({ACCOUNT_COLUMNS}, skeleton)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                ))
                .map_err(io)?;
            for record in &batch.created {
                insert_account
                    .execute(params![
                        record.id.0 as i64,
                        record.name,
                        record.kind.as_str(),
                        record.balance_cu,
                        lots_json(&record.lots)?,
                        record.stipend_period,
                        record.created_at_ms,
                        usage_json(&record.usage)?,
                        account_name_skeleton(&record.name),
                    ])
                    .map_err(io)?;
            }
            let mut insert_transfer = transaction
                .prepare_cached(&format!(
                    "INSERT INTO transfers ({TRANSFER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ))
                .map_err(io)?;
            for transfer in &batch.transfers {
                insert_transfer
                    .execute(params![
                        transfer.id.0.to_be_bytes().as_slice(),
                        transfer.kind.as_str(),
                        transfer.debit.0 as i64,
                        transfer.credit.0 as i64,
                        transfer.amount_cu as i64,
                        transfer.created_at_ms,
                        transfer.lot_expires_at_ms,
                        transfer.period,
                    ])
                    .map_err(io)?;
            }
        }
        if let Some(updates) = &batch.checkpoint {
            // A rewritten row's old copy is zeroed, not left in the page: an account's name then
            // lives in one place only, which closing the account overwrites. `FAST` zeroes it in
            // the page being written anyway, at no extra I/O (docs/benchmarks.md: within the
            // noise of the settle benchmark); the appends above, the bulk, free nothing.
            transaction
                .execute_batch("PRAGMA secure_delete = FAST")
                .map_err(io)?;
            let mut update_account = transaction
                .prepare_cached(
                    "UPDATE accounts SET balance_cu = ?2, lots = ?3, stipend_period = ?4, usage = ?5,
                                         kind = ?6
                     WHERE id = ?1",
                )
                .map_err(io)?;
            for update in updates {
                let changed = update_account
                    .execute(params![
                        update.id.0 as i64,
                        update.balance_cu,
                        lots_json(&update.lots)?,
                        update.stipend_period,
                        usage_json(&update.usage)?,
                        update.kind.as_str(),
                    ])
                    .map_err(io)?;
                if changed != 1 {
                    return Err(corrupt(format!("update of missing account {}", update.id)));
                }
            }
            drop(update_account);
            transaction
                .execute_batch("PRAGMA secure_delete = OFF")
                .map_err(io)?;
            transaction
                .execute(
                    "UPDATE meta SET value = (SELECT COALESCE(MAX(seq), 0) FROM transfers)
                     WHERE key = 'checkpoint_seq'",
                    [],
                )
                .map_err(io)?;
        }
        transaction.commit().map_err(io)
    }

    fn probe_write(&self) -> Result<(), StoreError> {
        let mut connection = self.writer()?;
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(io)?;
        // A real write of one page, so that a full disk still says so.
        transaction
            .execute(
                "UPDATE meta SET value = value WHERE key = 'checkpoint_seq'",
                [],
            )
            .map_err(io)?;
        transaction.commit().map_err(io)
    }

    fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        self.writer()?
            .execute(
                "INSERT INTO keys (id, account_id, secret_sha256, created_at_ms, revoked_at_ms, name)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    key.id,
                    key.account.0 as i64,
                    key.secret_sha256.as_slice(),
                    key.created_at_ms,
                    key.revoked_at_ms,
                    key.name
                ],
            )
            .map_err(io)?;
        Ok(())
    }

    fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool, StoreError> {
        let changed = zeroing(&mut *self.writer()?, |writer| {
            writer
                .execute(
                    "UPDATE keys SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1",
                    params![id, at_ms],
                )
                .map_err(io)
        })?;
        Ok(changed == 1)
    }

    fn accounts_named_like(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(AccountId, String)>, StoreError> {
        // A range over the names' index: every name with the prefix sorts from the prefix up to
        // the prefix followed by the last character there is.
        let upper = format!("{prefix}{}", char::MAX);
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT id, name FROM accounts WHERE name >= ?1 AND name < ?2
                     ORDER BY name LIMIT ?3",
                )
                .map_err(io)?;
            let rows = statement
                .query_map(
                    params![prefix, upper, limit.min(i64::MAX as usize) as i64],
                    |row| {
                        Ok((
                            AccountId(row.get::<_, i64>(0)? as u64),
                            row.get::<_, String>(1)?,
                        ))
                    },
                )
                .map_err(io)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io)
        })
    }

    fn journal_starts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT run, record FROM agent_journal WHERE seq = 0")
                .map_err(io)?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(io)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io)
        })
    }

    fn journal_of(&self, run: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached("SELECT record FROM agent_journal WHERE run = ?1 ORDER BY seq")
                .map_err(io)?;
            let rows = statement.query_map([run], |row| row.get(0)).map_err(io)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io)
        })
    }

    fn journal_erase(&self, run: &str) -> Result<(), StoreError> {
        stipend_ledger::RunJournal::journal_delete(self, run)
    }

    fn erase_names(&self, id: AccountId, anonymous_name: &str) -> Result<(), StoreError> {
        let mut writer = self.writer()?;
        // As a journal's deletion: the old name is overwritten in the file, in the table and
        // both its indexes, and the log's frames that held it are dropped (if no reader holds
        // them now, else at a later checkpoint).
        zeroing(&mut writer, |writer| {
            let transaction = writer.unchecked_transaction().map_err(io)?;
            let changed = transaction
                .execute(
                    "UPDATE accounts SET name = ?2, skeleton = ?3 WHERE id = ?1",
                    params![
                        id.0 as i64,
                        anonymous_name,
                        account_name_skeleton(anonymous_name)
                    ],
                )
                .map_err(io)?;
            if changed != 1 {
                return Err(StoreError::Io(format!("no account {id} to rename")));
            }
            transaction
                .execute(
                    "UPDATE keys SET name = NULL WHERE account_id = ?1",
                    params![id.0 as i64],
                )
                .map_err(io)?;
            transaction.commit().map_err(io)
        })?;
        let _ = writer.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        Ok(())
    }

    fn report(&self, period_start_ms: i64) -> Result<Option<String>, StoreError> {
        self.with_reader(|connection| {
            connection
                .query_row(
                    "SELECT body FROM reports WHERE period_start_ms = ?1",
                    params![period_start_ms],
                    |row| row.get(0),
                )
                .optional()
                .map_err(io)
        })
    }

    fn keep_report(&self, report: &KeptReport) -> Result<String, StoreError> {
        let writer = self.writer()?;
        writer
            .execute(
                "INSERT INTO reports (period_start_ms, epsilon, made_at_ms, body)
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (period_start_ms) DO NOTHING",
                params![
                    report.period_start_ms,
                    report.epsilon,
                    report.made_at_ms,
                    report.body
                ],
            )
            .map_err(io)?;
        writer
            .query_row(
                "SELECT body FROM reports WHERE period_start_ms = ?1",
                params![report.period_start_ms],
                |row| row.get(0),
            )
            .map_err(io)
    }

    fn reports(&self) -> Result<Vec<(i64, f64)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT period_start_ms, epsilon FROM reports ORDER BY period_start_ms",
                )
                .map_err(io)?;
            let rows = statement
                .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                .map_err(io)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io)
        })
    }

    fn record_action(&self, action: &OperatorAction) -> Result<(), StoreError> {
        self.writer()?
            .execute(
                "INSERT INTO operator_actions (at_ms, actor, action, account_id, object, amount_cu)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    action.at_ms,
                    action.actor,
                    action.action,
                    action.account.map(|account| account.0 as i64),
                    action.object,
                    action.amount_cu.map(|cu| cu.min(i64::MAX as u64) as i64),
                ],
            )
            .map_err(io)?;
        Ok(())
    }

    fn actions(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, OperatorAction)>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(
                    "SELECT seq, at_ms, actor, action, account_id, object, amount_cu
                     FROM operator_actions WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
                )
                .map_err(io)?;
            let rows = statement
                .query_map(
                    params![
                        before.unwrap_or(i64::MAX),
                        limit.min(i64::MAX as usize) as i64
                    ],
                    |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            OperatorAction {
                                at_ms: row.get(1)?,
                                actor: row.get(2)?,
                                action: row.get(3)?,
                                account: row
                                    .get::<_, Option<i64>>(4)?
                                    .map(|id| AccountId(id as u64)),
                                object: row.get(5)?,
                                amount_cu: row.get::<_, Option<i64>>(6)?.map(|cu| cu.max(0) as u64),
                            },
                        ))
                    },
                )
                .map_err(io)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io)
        })
    }

    fn set_key_name(&self, id: &str, name: Option<&str>) -> Result<bool, StoreError> {
        let changed = zeroing(&mut *self.writer()?, |writer| {
            writer
                .execute("UPDATE keys SET name = ?2 WHERE id = ?1", params![id, name])
                .map_err(io)
        })?;
        Ok(changed == 1)
    }

    fn set_key_cap(&self, id: &str, cap_cu: Option<u64>) -> Result<bool, StoreError> {
        let changed = zeroing(&mut *self.writer()?, |writer| {
            writer
                .execute(
                    "UPDATE keys SET cap_cu = ?2 WHERE id = ?1",
                    params![id, cap_cu.map(|cap| cap.min(i64::MAX as u64) as i64)],
                )
                .map_err(io)
        })?;
        Ok(changed == 1)
    }

    fn add_key_spends(&self, spends: &[KeySpend]) -> Result<Vec<u64>, StoreError> {
        // A key's row holds its name: its old copies are zeroed as it is rewritten.
        zeroing(&mut *self.writer()?, |writer| {
            add_key_spends_on(writer, spends)
        })
    }

    fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"))
                .map_err(io)?;
            statement
                .query_row([id], key_from_row)
                .optional()
                .map_err(io)?
                .transpose()
        })
    }

    fn keys_of(&self, account: AccountId) -> Result<Vec<KeyRecord>, StoreError> {
        self.with_reader(|connection| {
            let mut statement = connection
                .prepare_cached(&format!(
                    "SELECT {KEY_COLUMNS} FROM keys WHERE account_id = ?1 ORDER BY created_at_ms, id"
                ))
                .map_err(io)?;
            let rows = statement
                .query_map([account.0 as i64], key_from_row)
                .map_err(io)?;
            let mut keys = Vec::new();
            for row in rows {
                keys.push(row.map_err(io)??);
            }
            Ok(keys)
        })
    }

    fn access_rules(&self) -> Result<AccessRules, StoreError> {
        self.with_reader(|connection| {
            in_snapshot(connection, |connection| {
                let version = read_access_version(connection)?;
                let mut models = Vec::new();
                let mut statement = connection
                    .prepare_cached("SELECT model, accounts, groups FROM model_access ORDER BY model")
                    .map_err(io)?;
                let rows = statement
                    .query_map([], |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, String>(2)?,
                        ))
                    })
                    .map_err(io)?;
                for row in rows {
                    let (model, accounts, groups) = row.map_err(io)?;
                    models.push(model_access_from_json(model, &accounts, &groups)?);
                }
                let mut groups: Vec<(String, Vec<AccountId>)> = Vec::new();
                let mut statement = connection
                    .prepare_cached(
                        "SELECT group_name, account_id FROM group_members ORDER BY group_name, account_id",
                    )
                    .map_err(io)?;
                let rows = statement
                    .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)))
                    .map_err(io)?;
                for row in rows {
                    let (group, account) = row.map_err(io)?;
                    let account = AccountId(account as u64);
                    match groups.last_mut() {
                        Some((name, members)) if *name == group => members.push(account),
                        _ => groups.push((group, vec![account])),
                    }
                }
                Ok(AccessRules {
                    models,
                    groups,
                    version,
                })
            })
        })
    }

    fn access_version(&self) -> Result<i64, StoreError> {
        self.with_reader(read_access_version)
    }

    fn set_model_access(
        &self,
        model: &str,
        accounts: &[AccountId],
        groups: &[String],
    ) -> Result<(), StoreError> {
        let mut connection = self.writer()?;
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(io)?;
        if accounts.is_empty() && groups.is_empty() {
            transaction
                .execute("DELETE FROM model_access WHERE model = ?1", [model])
                .map_err(io)?;
        } else {
            let (accounts, groups) = model_access_json(accounts, groups)?;
            transaction
                .execute(
                    "INSERT INTO model_access (model, accounts, groups) VALUES (?1, ?2, ?3)
                     ON CONFLICT (model) DO UPDATE SET accounts = excluded.accounts,
                                                       groups = excluded.groups",
                    params![model, accounts, groups],
                )
                .map_err(io)?;
        }
        transaction
            .execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'access_version'",
                [],
            )
            .map_err(io)?;
        transaction.commit().map_err(io)
    }

    fn set_group_member(
        &self,
        group: &str,
        account: AccountId,
        member: bool,
    ) -> Result<bool, StoreError> {
        let mut connection = self.writer()?;
        let transaction = connection
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(io)?;
        let changed = if member {
            transaction.execute(
                "INSERT OR IGNORE INTO group_members (group_name, account_id) VALUES (?1, ?2)",
                params![group, account.0 as i64],
            )
        } else {
            transaction.execute(
                "DELETE FROM group_members WHERE group_name = ?1 AND account_id = ?2",
                params![group, account.0 as i64],
            )
        }
        .map_err(io)?;
        if changed > 0 {
            transaction
                .execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'access_version'",
                    [],
                )
                .map_err(io)?;
        }
        transaction.commit().map_err(io)?;
        Ok(changed > 0)
    }

    fn checkpoint_seq(&self) -> Result<i64, StoreError> {
        self.with_reader(read_checkpoint_seq)
    }

    fn transfers_after_checkpoint(
        &self,
        visit: &mut dyn FnMut(Transfer),
    ) -> Result<(), StoreError> {
        self.with_reader(|connection| {
            in_snapshot(connection, |connection| {
                let checkpoint = read_checkpoint_seq(connection)?;
                visit_tail(connection, checkpoint, visit)
            })
        })
    }

    fn audit(
        &self,
        visit_account: &mut dyn FnMut(AuditRow),
        visit_tail_transfer: &mut dyn FnMut(Transfer),
    ) -> Result<TransferAudit, StoreError> {
        self.with_reader(|connection| {
            in_snapshot(connection, |connection| {
                audit_in_snapshot(connection, visit_account, visit_tail_transfer)
            })
        })
    }
}

/// Runs `read` inside one read transaction, so everything it reads comes from one snapshot.
fn in_snapshot<T>(
    connection: &Connection,
    read: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    connection.execute_batch("BEGIN").map_err(io)?;
    let result = read(connection);
    let end = connection.execute_batch("COMMIT").map_err(io);
    let value = result?;
    end?;
    Ok(value)
}

fn read_checkpoint_seq(connection: &Connection) -> Result<i64, StoreError> {
    connection
        .query_row(
            "SELECT value FROM meta WHERE key = 'checkpoint_seq'",
            [],
            |row| row.get(0),
        )
        .map_err(io)
}

fn visit_tail(
    connection: &Connection,
    checkpoint: i64,
    visit: &mut dyn FnMut(Transfer),
) -> Result<(), StoreError> {
    let mut statement = connection
        .prepare_cached(&format!(
            "SELECT {TRANSFER_COLUMNS} FROM transfers WHERE seq > ?1 ORDER BY seq"
        ))
        .map_err(io)?;
    let mut rows = statement.query([checkpoint]).map_err(io)?;
    while let Some(row) = rows.next().map_err(io)? {
        visit(transfer_from_row(row).map_err(io)??);
    }
    Ok(())
}

fn audit_in_snapshot(
    connection: &Connection,
    visit_account: &mut dyn FnMut(AuditRow),
    visit_tail_transfer: &mut dyn FnMut(Transfer),
) -> Result<TransferAudit, StoreError> {
    let checkpoint = read_checkpoint_seq(connection)?;
    // Aggregate once per side rather than once per account: spends are not indexed by account.
    let mut statement = connection
        .prepare(&format!(
            "WITH credits AS (
                 SELECT credit_account AS account_id, SUM(amount_cu) AS total
                 FROM transfers WHERE seq <= ?1 GROUP BY credit_account),
             debits AS (
                 SELECT debit_account AS account_id, SUM(amount_cu) AS total
                 FROM transfers WHERE seq <= ?1 GROUP BY debit_account)
             SELECT {ACCOUNT_COLUMNS}, COALESCE(credits.total, 0), COALESCE(debits.total, 0)
             FROM accounts
             LEFT JOIN credits ON credits.account_id = accounts.id
             LEFT JOIN debits ON debits.account_id = accounts.id
             ORDER BY accounts.id"
        ))
        .map_err(io)?;
    let mut rows = statement.query([checkpoint]).map_err(io)?;
    while let Some(row) = rows.next().map_err(io)? {
        let account = account_from_row(row).map_err(io)??;
        let credits_cu: i64 = row.get(8).map_err(io)?;
        let debits_cu: i64 = row.get(9).map_err(io)?;
        visit_account(AuditRow {
            account,
            credits_cu: i128::from(credits_cu),
            debits_cu: i128::from(debits_cu),
        });
    }
    visit_tail(connection, checkpoint, visit_tail_transfer)?;
    let mut audit = connection
        .query_row(
            "SELECT COUNT(*),
                    COALESCE(SUM(amount_cu <= 0), 0),
                    COALESCE(SUM(debit_account = credit_account), 0),
                    COALESCE(SUM(
                        debit_account NOT IN (SELECT id FROM accounts)
                        OR credit_account NOT IN (SELECT id FROM accounts)
                    ), 0)
             FROM transfers",
            [],
            |row| {
                Ok(TransferAudit {
                    checkpoint_seq: 0,
                    n_transfers: row.get::<_, i64>(0)? as u64,
                    n_amount_not_positive: row.get::<_, i64>(1)? as u64,
                    n_self: row.get::<_, i64>(2)? as u64,
                    n_unknown_account: row.get::<_, i64>(3)? as u64,
                })
            },
        )
        .map_err(io)?;
    audit.checkpoint_seq = checkpoint;
    Ok(audit)
}

impl stipend_ledger::RunJournal for SqliteStore {
    fn journal_append(&self, records: &[stipend_ledger::JournalRecord]) -> Result<(), StoreError> {
        let mut writer = self.writer()?;
        let transaction = writer.transaction().map_err(io)?;
        {
            let mut insert = transaction
                .prepare_cached("INSERT INTO agent_journal (run, seq, record) VALUES (?1, ?2, ?3)")
                .map_err(io)?;
            for record in records {
                insert
                    .execute(params![record.run, record.seq as i64, record.record])
                    .map_err(io)?;
            }
        }
        transaction.commit().map_err(io)
    }

    fn journal_load(&self) -> Result<Vec<stipend_ledger::JournalRecord>, StoreError> {
        let connection = self.reader()?;
        let records = {
            let mut select = connection
                .prepare("SELECT run, seq, record FROM agent_journal ORDER BY run, seq")
                .map_err(io)?;
            let rows = select
                .query_map([], |row| {
                    Ok(stipend_ledger::JournalRecord {
                        run: row.get(0)?,
                        seq: row.get::<_, i64>(1)? as u64,
                        record: row.get(2)?,
                    })
                })
                .map_err(io)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(io)?
        };
        self.give_back(connection);
        Ok(records)
    }

    fn journal_delete(&self, run: &str) -> Result<(), StoreError> {
        let mut writer = self.writer()?;
        // A journal holds a person's transcript: what is deleted is overwritten in the file, and
        // the log's frames that still held it are dropped by emptying the log (if no reader
        // holds it now, else at a later checkpoint).
        zeroing(&mut writer, |writer| {
            writer
                .execute("DELETE FROM agent_journal WHERE run = ?1", params![run])
                .map_err(io)
        })?;
        let _ = writer.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stipend_ledger::{AccountUpdate, JournalRecord, Lot, LotSource, RunJournal, Usage};

    fn journal_record(run: &str, seq: u64, text: &str) -> JournalRecord {
        JournalRecord {
            run: run.to_string(),
            seq,
            record: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_run_journal_reads_back_in_order_is_written_once_and_goes_with_its_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .journal_append(&[
                    journal_record("run_b", 0, "b0"),
                    journal_record("run_a", 1, "a1"),
                    journal_record("run_a", 0, "a0"),
                ])
                .unwrap();
            // A record already written is refused, and nothing of its batch is kept.
            let again = store.journal_append(&[
                journal_record("run_b", 1, "b1"),
                journal_record("run_a", 0, "a0 again"),
            ]);
            assert!(again.is_err());
        }
        // Durable across a reopen, in run and number order.
        let store = SqliteStore::open(&path).unwrap();
        let texts = |store: &SqliteStore| -> Vec<String> {
            store
                .journal_load()
                .unwrap()
                .into_iter()
                .map(|record| {
                    format!(
                        "{}:{}:{}",
                        record.run,
                        record.seq,
                        String::from_utf8(record.record).unwrap()
                    )
                })
                .collect()
        };
        assert_eq!(texts(&store), ["run_a:0:a0", "run_a:1:a1", "run_b:0:b0"]);
        store.journal_delete("run_a").unwrap();
        assert_eq!(texts(&store), ["run_b:0:b0"]);
    }

    fn record(id: u64, name: &str) -> AccountRecord {
        AccountRecord {
            id: AccountId(id),
            name: name.to_string(),
            kind: AccountKind::Person,
            balance_cu: 0,
            lots: Vec::new(),
            stipend_period: None,
            usage: Vec::new(),
            created_at_ms: 1,
        }
    }

    #[test]
    fn commit_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let gift = Transfer {
            id: TransferId(42),
            kind: TransferKind::Gift,
            debit: AccountId(1),
            credit: AccountId(2),
            amount_cu: 5,
            created_at_ms: 9,
            lot_expires_at_ms: None,
            period: None,
        };
        let spend = Transfer {
            id: TransferId(43),
            kind: TransferKind::Spend,
            amount_cu: 1,
            ..gift
        };
        {
            let store = SqliteStore::open(&path).unwrap();
            let batch = Batch {
                created: vec![record(1, "ann"), record(2, "bo")],
                transfers: vec![gift],
                checkpoint: Some(vec![
                    AccountUpdate {
                        id: AccountId(1),
                        kind: AccountKind::Person,
                        balance_cu: -5,
                        lots: vec![],
                        stipend_period: None,
                        usage: Vec::new(),
                    },
                    AccountUpdate {
                        id: AccountId(2),
                        kind: AccountKind::Person,
                        balance_cu: 5,
                        lots: vec![Lot {
                            remaining_cu: 5,
                            expires_at_ms: Some(100),
                            source: LotSource::Gift,
                        }],
                        stipend_period: Some(3),
                        usage: vec![Usage {
                            sink: AccountId(1),
                            period: 3,
                            day: 3,
                            requests: 2,
                            charged_cu: 7,
                        }],
                    },
                ]),
            };
            store.commit(&batch).unwrap();
            assert_eq!(store.checkpoint_seq().unwrap(), 1);
            // A batch without a checkpoint appends to the log and leaves the rows alone.
            store
                .commit(&Batch {
                    transfers: vec![spend],
                    ..Batch::default()
                })
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let bo = store.account_by_name("bo").unwrap().unwrap();
        assert_eq!(
            bo.balance_cu, 5,
            "the row is the checkpoint, not the log's end"
        );
        assert_eq!(bo.stipend_period, Some(3));
        assert_eq!(bo.usage[0].requests, 2);
        assert_eq!(bo.lots[0].expires_at_ms, Some(100));
        assert_eq!(store.checkpoint_seq().unwrap(), 1);
        assert_eq!(store.transfer(TransferId(42)).unwrap(), Some(gift));
        // Only caller-chosen ids (grants, gifts) are looked up by id.
        assert_eq!(store.transfer(TransferId(43)).unwrap(), None);
        assert_eq!(store.transfer(TransferId(44)).unwrap(), None);
        // History leaves spends out.
        assert_eq!(store.transfers_of(AccountId(2), 10).unwrap(), vec![gift]);
        assert_eq!(store.account_id_max().unwrap(), Some(AccountId(2)));
        assert_eq!(store.accounts(Some(AccountId(1)), 10).unwrap().len(), 1);
        let mut tail = Vec::new();
        store
            .transfers_after_checkpoint(&mut |transfer| tail.push(transfer))
            .unwrap();
        assert_eq!(tail, vec![spend]);
        let mut rows = Vec::new();
        let mut audited_tail = Vec::new();
        let audit = store
            .audit(&mut |row| rows.push(row), &mut |t| audited_tail.push(t))
            .unwrap();
        assert_eq!(audit.n_transfers, 2);
        assert_eq!(audit.checkpoint_seq, 1);
        assert_eq!(audited_tail, vec![spend]);
        assert_eq!(rows[0].debits_cu, 5, "sums stop at the checkpoint");
        assert_eq!(rows[1].credits_cu, 5);
    }

    #[test]
    fn a_failed_batch_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
        store
            .commit(&Batch {
                created: vec![record(1, "ann")],
                ..Batch::default()
            })
            .unwrap();
        // The duplicate name fails the second insert; the first must roll back with it.
        let error = store
            .commit(&Batch {
                created: vec![record(2, "cy"), record(3, "ann")],
                ..Batch::default()
            })
            .unwrap_err();
        assert!(matches!(error, StoreError::Io(_)), "{error:?}");
        assert_eq!(store.account_by_name("cy").unwrap(), None);
    }

    #[test]
    fn keys_store_hashes_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("ledger.db")).unwrap();
        let key = KeyRecord {
            id: "k1".to_string(),
            account: AccountId(7),
            secret_sha256: [9; 32],
            created_at_ms: 5,
            revoked_at_ms: None,
            cap: None,
            name: None,
        };
        store.insert_key(&key).unwrap();
        assert!(store.insert_key(&key).is_err(), "ids are unique");
        assert_eq!(store.key("k1").unwrap(), Some(key.clone()));
        assert_eq!(store.keys_of(AccountId(7)).unwrap(), vec![key]);
        assert!(store.revoke_key("k1", 10).unwrap());
        assert!(
            store.revoke_key("k1", 20).unwrap(),
            "revoking again keeps the first time"
        );
        assert_eq!(store.key("k1").unwrap().unwrap().revoked_at_ms, Some(10));
        assert!(!store.revoke_key("nope", 10).unwrap());
        assert_eq!(store.key("nope").unwrap(), None);
    }

    #[test]
    fn the_writers_page_cache_is_what_was_asked() {
        let dir = tempfile::tempdir().unwrap();
        let cache = |store: &SqliteStore| -> i64 {
            let writer = store.writer.as_ref().unwrap().lock();
            writer
                .query_row("PRAGMA cache_size", [], |row| row.get(0))
                .unwrap()
        };
        let store = SqliteStore::open_with_cache(&dir.path().join("a.db"), 4 << 20).unwrap();
        assert_eq!(cache(&store), -4_096, "4 MiB, in KiB");
        let store = SqliteStore::open(&dir.path().join("b.db")).unwrap();
        assert_eq!(cache(&store), -16_384);
    }

    #[test]
    fn every_file_of_the_store_is_private() {
        // A regression test: the files took the umask's mode (0644; the lock 0666 under umask
        // 000), so any local user could read balances and key hashes, or flock the lock file.
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(&path).unwrap();
        for file in [
            path.clone(),
            sidecar(&path, "-wal"),
            sidecar(&path, "-shm"),
            lock_path(&path),
        ] {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        drop(store);
        // Files left readable by others (a backup restored, say) are made private on open.
        for file in [path.clone(), lock_path(&path)] {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        let _store = SqliteStore::open(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&lock_path(&path)), 0o600);
    }

    #[test]
    fn a_store_from_before_skeletons_gets_them_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            // A store at schema 3, with names made before names were normalized.
            let mut connection = Connection::open(&path).unwrap();
            for migration in &MIGRATIONS[..3] {
                connection.execute_batch(migration).unwrap();
            }
            connection.execute_batch("PRAGMA user_version = 3").unwrap();
            let transaction = connection.transaction().unwrap();
            for (id, name) in [(1, "issuer"), (2, "Alice"), (3, "bob")] {
                transaction
                    .execute(
                        "INSERT INTO accounts (id, name, kind, balance_cu, lots, created_at_ms)
                         VALUES (?1, ?2, 'person', 0, '[]', 1)",
                        params![id, name],
                    )
                    .unwrap();
            }
            transaction.commit().unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let found = |skeleton: &str| {
            store
                .account_by_skeleton(&account_name_skeleton(skeleton))
                .unwrap()
                .map(|record| record.name)
        };
        assert_eq!(found("alice").as_deref(), Some("Alice"));
        assert_eq!(found("B0B").as_deref(), Some("bob"));
        assert_eq!(found("carol"), None);
        // A new account gets its skeleton as it is written.
        store
            .commit(&Batch {
                created: vec![record(4, "carol")],
                ..Batch::default()
            })
            .unwrap();
        assert_eq!(found("CAROL").as_deref(), Some("carol"));
        drop(store);
        // The version is recorded: a second open has nothing to remake.
        let connection = Connection::open(&path).unwrap();
        let version: i64 = connection
            .query_row(
                "SELECT value FROM meta WHERE key = 'skeleton_version'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(version, ACCOUNT_NAME_SKELETON_VERSION);
    }

    #[test]
    fn one_writer_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let first = SqliteStore::open(&path).unwrap();
        assert!(SqliteStore::is_locked(&path));
        assert!(matches!(
            SqliteStore::open(&path),
            Err(StoreError::Locked { .. })
        ));
        // Readers are welcome while the writer runs.
        let reader = SqliteStore::open_read_only(&path).unwrap();
        assert_eq!(reader.account_id_max().unwrap(), None);
        assert!(
            reader
                .commit(&Batch {
                    created: vec![record(1, "x")],
                    ..Batch::default()
                })
                .is_err()
        );
        drop(first);
        assert!(!SqliteStore::is_locked(&path));
        SqliteStore::open(&path).unwrap();
    }
}
