//! The storage trait: what the ledger needs from a durable store, in the ledger's own types.
//!
//! Each backend (SQLite now, PostgreSQL later) implements [`Store`] with its own schema and
//! migrations; the ledger logic never sees a driver type.

pub mod rows;

use crate::account::{AccountId, AccountKind, AccountRecord, Lot, Usage};
use crate::transfer::{Transfer, TransferId};

/// Why the store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the store for writing.
    #[error("the store at {path} is in use by another process (a running `stipend serve`?)")]
    Locked {
        /// The store's path.
        path: String,
    },
    /// Reading or writing failed: a full disk, a lost connection, a permission.
    #[error("store I/O failed: {0}")]
    Io(String),
    /// The stored data does not decode: a bug or a corrupted file.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The data was written by a newer version of Stipend.
    #[error("the store's schema version {found} is newer than this binary's {supported}")]
    SchemaTooNew {
        /// What the store holds.
        found: i64,
        /// What this binary knows.
        supported: i64,
    },
}

/// An account's balance state at a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountUpdate {
    /// Which account.
    pub id: AccountId,
    /// Its kind afterwards (a closure closes it).
    pub kind: AccountKind,
    /// Its balance afterwards.
    pub balance_cu: i64,
    /// Its lots afterwards.
    pub lots: Vec<Lot>,
    /// The last period whose stipend is applied.
    pub stipend_period: Option<i64>,
    /// What it spent in its latest period, per sink.
    pub usage: Vec<Usage>,
}

/// Everything one group commit writes, in one atomic, durable transaction.
///
/// The transfer log is the truth; account rows are checkpoints of it. A batch appends accounts
/// and transfers; a batch that carries a checkpoint also rewrites the accounts changed since the
/// last one and records that every transfer up to its own last one is reflected in them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    /// New accounts, in their initial state.
    pub created: Vec<AccountRecord>,
    /// New transfers, in order.
    pub transfers: Vec<Transfer>,
    /// With a checkpoint: the state of every account changed since the previous checkpoint,
    /// as of the end of this batch.
    pub checkpoint: Option<Vec<AccountUpdate>>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.transfers.is_empty() && self.checkpoint.is_none()
    }
}

/// One account as the audit sees it: its stored (checkpointed) state and the sums of the
/// transfers up to the checkpoint that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// The stored account.
    pub account: AccountRecord,
    /// The sum of transfers into it, up to the checkpoint.
    pub credits_cu: i128,
    /// The sum of transfers out of it, up to the checkpoint.
    pub debits_cu: i128,
}

/// Facts about all transfers, for the audit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferAudit {
    /// The last transfer reflected in the account rows.
    pub checkpoint_seq: i64,
    /// How many transfers there are.
    pub n_transfers: u64,
    /// Transfers whose amount is not positive.
    pub n_amount_not_positive: u64,
    /// Transfers from an account to itself.
    pub n_self: u64,
    /// Transfers naming an account that does not exist.
    pub n_unknown_account: u64,
}

/// An API key as stored: only a hash of its secret, never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The key's public id (the part of the key before its secret).
    pub id: String,
    /// The account it spends from.
    pub account: AccountId,
    /// SHA-256 of the secret.
    pub secret_sha256: [u8; 32],
    /// When it was created (ms since the epoch).
    pub created_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
    /// Its cap, if it has one: the most it may spend in a period.
    pub cap: Option<KeyCap>,
    /// What its person calls it ("laptop", "the script"), if anything.
    pub name: Option<String>,
}

/// A key's cap: the most it may spend in one stipend period, and what it spent in the period
/// last written down (servers write what their calls spent about once a second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCap {
    /// The most the key may spend in a period, in cu.
    pub cap_cu: u64,
    /// The period `spent_cu` counts in.
    pub period: i64,
    /// What the key spent in that period, as last written down, in cu.
    pub spent_cu: u64,
}

/// What one key spent in one period since it was last written down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpend {
    /// The key's id.
    pub id: String,
    /// The period.
    pub period: i64,
    /// What it spent, in cu.
    pub spent_cu: u64,
}

/// Who may use a model whose use is restricted: these accounts, and the members of these
/// groups. A model with no rule is open to everyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAccess {
    /// The model's name, as clients ask for it.
    pub model: String,
    /// Accounts that may use it.
    pub accounts: Vec<AccountId>,
    /// Groups whose members may use it.
    pub groups: Vec<String>,
}

/// One period's transparency report as kept: made once, then published unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptReport {
    /// When its period began, ms since the epoch.
    pub period_start_ms: i64,
    /// The privacy budget it spent.
    pub epsilon: f64,
    /// When it was made, ms since the epoch.
    pub made_at_ms: i64,
    /// The report, as published (JSON).
    pub body: String,
}

/// One thing an operator did, as the operator log keeps it: who, when, what, to which account
/// (by id, so that closing an account erases its name from the log too) and how much. Never
/// any content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorAction {
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// Who: `cli` (the operator's command line, on this machine) or `operator key <id>`.
    pub actor: String,
    /// What: `grant`, `account create`, `key revoke`, `model access`, …
    pub action: String,
    /// The account it was done to, if any.
    pub account: Option<AccountId>,
    /// The key, model or group it was done to, if any.
    pub object: Option<String>,
    /// How much, in cu, if an amount moved or was set.
    pub amount_cu: Option<u64>,
}

/// The longest group name.
pub const GROUP_NAME_LEN_MAX: usize = 64;

/// Checks a group's name: 1 to [`GROUP_NAME_LEN_MAX`] of `a-z`, `0-9`, `-`, `_`, `.`.
pub fn check_group_name(name: &str) -> Result<(), String> {
    let good = !name.is_empty()
        && name.len() <= GROUP_NAME_LEN_MAX
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || b"-_.".contains(&byte)
        });
    if good {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a group name: 1 to {GROUP_NAME_LEN_MAX} of a-z, 0-9, '-', '_', '.'"
        ))
    }
}

/// The access rules in force: the restricted models and every group's members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessRules {
    /// The restricted models.
    pub models: Vec<ModelAccess>,
    /// Each group, with its members.
    pub groups: Vec<(String, Vec<AccountId>)>,
    /// Counts the changes made to the rules: the same number means nothing changed.
    pub version: i64,
}

/// A durable store for the ledger.
///
/// Reads may run on any thread; [`Store::commit`] is called by one writer at a time. A commit is
/// atomic and durable (fsync'd) when it returns `Ok`.
pub trait Store: Send + Sync {
    /// One account by id.
    fn account(&self, id: AccountId) -> Result<Option<AccountRecord>, StoreError>;
    /// One account by name.
    fn account_by_name(&self, name: &str) -> Result<Option<AccountRecord>, StoreError>;
    /// One account whose name has this confusable skeleton
    /// ([`account_name_skeleton`](crate::account_name_skeleton)), if any does.
    fn account_by_skeleton(&self, skeleton: &str) -> Result<Option<AccountRecord>, StoreError>;
    /// Up to `limit` accounts with ids above `after`, in id order.
    fn accounts(
        &self,
        after: Option<AccountId>,
        limit: usize,
    ) -> Result<Vec<AccountRecord>, StoreError>;
    /// The highest account id in use.
    fn account_id_max(&self) -> Result<Option<AccountId>, StoreError>;
    /// One transfer by id.
    fn transfer(&self, id: TransferId) -> Result<Option<Transfer>, StoreError>;
    /// The latest `limit` transfers other than spends that debit or credit `account`, newest
    /// first. (Spends are the bulk of the log and are not indexed by account.)
    fn transfers_of(&self, account: AccountId, limit: usize) -> Result<Vec<Transfer>, StoreError>;
    /// Every transfer that debits or credits `account`, spends included, oldest first: what a
    /// person's export holds. Spends are not indexed by account, so this reads the whole log.
    fn all_transfers_of(&self, account: AccountId) -> Result<Vec<Transfer>, StoreError> {
        let _ = account;
        Err(StoreError::Io(
            "this store cannot list an account's transfers".to_string(),
        ))
    }
    /// The last transfer reflected in the account rows.
    fn checkpoint_seq(&self) -> Result<i64, StoreError>;
    /// Visits, in order, every transfer after the checkpoint: the tail that recovery replays.
    fn transfers_after_checkpoint(&self, visit: &mut dyn FnMut(Transfer))
    -> Result<(), StoreError>;
    /// Writes a batch atomically and durably.
    fn commit(&self, batch: &Batch) -> Result<(), StoreError>;
    /// Writes nothing, durably: succeeds once the store takes writes again after a failed
    /// commit (the disk has room, the database is back and this process holds it again).
    fn probe_write(&self) -> Result<(), StoreError>;
    /// Stores a new key, durably.
    fn insert_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    /// Marks a key revoked, durably. Returns false if there is no such key.
    fn revoke_key(&self, id: &str, at_ms: i64) -> Result<bool, StoreError>;
    /// One key by its public id.
    fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Every key of an account, oldest first.
    fn keys_of(&self, account: AccountId) -> Result<Vec<KeyRecord>, StoreError>;
    /// The ids of the keys created or revoked since `since` (a position this returns, by the
    /// store's own clock; `None` for the first call), and the position to ask from next time.
    /// A store that only one process writes needs none: its key ring sees every change itself.
    fn keys_changed_since(&self, since: Option<i64>) -> Result<(Vec<String>, i64), StoreError> {
        let _ = since;
        Ok((Vec::new(), 0))
    }
    /// Up to `limit` accounts whose name begins with `prefix`, in name order: their ids and
    /// names (an operator's search).
    fn accounts_named_like(
        &self,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<(AccountId, String)>, StoreError> {
        let _ = (prefix, limit);
        Ok(Vec::new())
    }
    /// Names a key (or, with `None`, takes its name away). Returns false if there is no such
    /// key.
    fn set_key_name(&self, id: &str, name: Option<&str>) -> Result<bool, StoreError> {
        let _ = (id, name);
        Err(StoreError::Io("this store keeps no key names".to_string()))
    }
    /// Sets a key's cap per period (or, with `None`, takes it away); what it spent this period is
    /// kept. Returns false if there is no such key. Durable when it returns.
    fn set_key_cap(&self, id: &str, cap_cu: Option<u64>) -> Result<bool, StoreError> {
        let _ = (id, cap_cu);
        Err(StoreError::Io("this store keeps no key caps".to_string()))
    }
    /// Adds what keys spent to what they spent in their period (a key's count starts again in
    /// a new period); returns each key's total for its period, in order (0 for a key that is
    /// gone). Durable when it returns.
    fn add_key_spends(&self, spends: &[KeySpend]) -> Result<Vec<u64>, StoreError> {
        let _ = spends;
        Err(StoreError::Io("this store keeps no key caps".to_string()))
    }
    /// The access rules in force (models restricted to some accounts and groups).
    fn access_rules(&self) -> Result<AccessRules, StoreError> {
        Ok(AccessRules::default())
    }
    /// How many changes the access rules have had: cheap, for servers that follow them.
    fn access_version(&self) -> Result<i64, StoreError> {
        Ok(0)
    }
    /// Restricts `model` to `accounts` and the members of `groups`, or, with both empty, opens
    /// it to everyone again. Durable when it returns.
    fn set_model_access(
        &self,
        model: &str,
        accounts: &[AccountId],
        groups: &[String],
    ) -> Result<(), StoreError> {
        let _ = (model, accounts, groups);
        Err(StoreError::Io(
            "this store keeps no access rules".to_string(),
        ))
    }
    /// Adds `account` to `group` (or, with `member` false, takes it out). Returns whether that
    /// changed anything. Durable when it returns.
    fn set_group_member(
        &self,
        group: &str,
        account: AccountId,
        member: bool,
    ) -> Result<bool, StoreError> {
        let _ = (group, account, member);
        Err(StoreError::Io(
            "this store keeps no access rules".to_string(),
        ))
    }
    /// Appends to the operator log. Durable when it returns.
    fn record_action(&self, action: &OperatorAction) -> Result<(), StoreError> {
        let _ = action;
        Err(StoreError::Io(
            "this store keeps no operator log".to_string(),
        ))
    }
    /// Up to `limit` entries of the operator log before the entry numbered `before` (all, if
    /// `None`), newest first, each with its number.
    fn actions(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, OperatorAction)>, StoreError> {
        let _ = (before, limit);
        Ok(Vec::new())
    }
    /// Erases what names a closed account's person: the account takes `anonymous_name` (its
    /// skeleton with it), and its keys lose their names. Where the store can, the old bytes are
    /// overwritten, not just unlinked. Durable when it returns.
    fn erase_names(&self, id: AccountId, anonymous_name: &str) -> Result<(), StoreError> {
        let _ = (id, anonymous_name);
        Err(StoreError::Io("this store cannot erase names".to_string()))
    }
    /// Every journaled agent run, of every server, with its first record (which names its
    /// person; the agents crate reads it).
    fn journal_starts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(Vec::new())
    }
    /// A run's journal records, in order, whichever server wrote them.
    fn journal_of(&self, run: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let _ = run;
        Ok(Vec::new())
    }
    /// Erases a run's journal, whichever server wrote it (the bytes overwritten where the store
    /// can).
    fn journal_erase(&self, run: &str) -> Result<(), StoreError> {
        let _ = run;
        Err(StoreError::Io("this store keeps no journals".to_string()))
    }
    /// The transparency report kept for the period that began at `period_start_ms`, if any.
    fn report(&self, period_start_ms: i64) -> Result<Option<String>, StoreError> {
        let _ = period_start_ms;
        Ok(None)
    }
    /// Keeps a period's transparency report (its published JSON and the ε it spent) unless one is
    /// kept already, and returns the one kept: of two servers that made one at once, the first
    /// to write wins and both publish it. Durable when it returns.
    fn keep_report(&self, report: &KeptReport) -> Result<String, StoreError> {
        let _ = report;
        Err(StoreError::Io(
            "this store keeps no transparency reports".to_string(),
        ))
    }
    /// Every kept report's period start and ε, oldest first: the privacy budget spent so far.
    fn reports(&self) -> Result<Vec<(i64, f64)>, StoreError> {
        Ok(Vec::new())
    }
    /// From one consistent snapshot: visits every account with its transfer sums up to the
    /// checkpoint, then every transfer after it, in order; and returns facts about all transfers.
    fn audit(
        &self,
        visit_account: &mut dyn FnMut(AuditRow),
        visit_tail: &mut dyn FnMut(Transfer),
    ) -> Result<TransferAudit, StoreError>;
}

/// One record of an agent run's journal: opaque bytes to the store (the agents crate writes and
/// reads them), numbered from 0 within their run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRecord {
    /// The run.
    pub run: String,
    /// Its number within the run.
    pub seq: u64,
    /// What the agents crate wrote.
    pub record: Vec<u8>,
}

/// Where agent runs keep their journals: the ledger's own store, so that a run and the
/// compute it moved live and die together.
pub trait RunJournal: Send + Sync {
    /// Appends records, all or none, durably (committed before it returns). A record whose run
    /// and number are already there is an error: a journal is written once.
    fn journal_append(&self, records: &[JournalRecord]) -> Result<(), StoreError>;
    /// Every record of every run, in run and number order.
    fn journal_load(&self) -> Result<Vec<JournalRecord>, StoreError>;
    /// Forgets a run's journal.
    fn journal_delete(&self, run: &str) -> Result<(), StoreError>;
}
