//! The operator's commands, as data: the CLI builds a [`Request`], which runs either directly on
//! the store or, while a server holds the store, inside that server through its control socket.
//! Either way the same [`execute`] runs it, so the two paths cannot drift apart.

use crate::limits::{HISTORY_LIMIT_MAX, LIST_LIMIT_MAX};
use serde::{Deserialize, Serialize};
use stipend_agents::Agents;
use stipend_gateway::KeyRing;
use stipend_ledger::units::format_utc;
use stipend_ledger::{
    AccountId, AccountKind, Books, Flops, LedgerError, Lot, LotSource, Transfer, TransferId,
    TransferKind,
};

/// An operator command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create a person or pool account.
    CreateAccount {
        /// Its name.
        name: String,
        /// Its kind.
        kind: AccountKind,
    },
    /// List accounts in id order.
    ListAccounts {
        /// Start after this id.
        after: Option<u64>,
        /// At most this many.
        limit: usize,
    },
    /// Show one account.
    ShowAccount {
        /// Its name.
        name: String,
        /// How many recent transfers to include.
        history: usize,
    },
    /// An operator grant from the issuer.
    Grant {
        /// The recipient.
        name: String,
        /// How much.
        amount_cu: u64,
        /// The transfer id (for idempotent retries); random if absent.
        id: Option<TransferId>,
        /// When the grant expires (ms since the epoch); never if absent.
        expires_at_ms: Option<i64>,
    },
    /// A gift or pool contribution.
    Give {
        /// The giver.
        from: String,
        /// The recipient.
        to: String,
        /// How much.
        amount_cu: u64,
        /// The transfer id (for idempotent retries); random if absent.
        id: Option<TransferId>,
    },
    /// Check the in-memory invariants of a running ledger.
    CheckInvariants,
    /// Create an API key for an account.
    CreateKey {
        /// The account's name.
        account: String,
    },
    /// Create an operator key: it opens the operator's page and API, and nothing else.
    CreateOperatorKey,
    /// List an account's keys.
    ListKeys {
        /// The account's name.
        account: String,
    },
    /// Revoke a key.
    RevokeKey {
        /// The key's id (`sk-stipend-<id>-…`).
        id: String,
    },
    /// Set a key's cap per period, or lift it.
    SetKeyCap {
        /// The key's id.
        id: String,
        /// The most it may spend a period, in cu; `None` lifts the cap.
        cap_cu: Option<u64>,
    },
    /// Restrict a model to accounts and groups, or (both empty) open it to everyone.
    SetModelAccess {
        /// The model's name.
        model: String,
        /// Accounts that may use it, by name.
        accounts: Vec<String>,
        /// Groups whose members may use it.
        groups: Vec<String>,
    },
    /// Add an account to a group, or take it out.
    SetGroupMember {
        /// The group.
        group: String,
        /// The account's name.
        name: String,
        /// In (true) or out.
        member: bool,
    },
    /// Show the models' access rules and the groups.
    ShowAccess,
    /// Everything held about an account, as its person's export holds it (without agent runs,
    /// which live in the server that runs them).
    ExportAccount {
        /// The account's name.
        name: String,
    },
    /// The operator log, newest first.
    ListActions {
        /// Before this entry's number.
        before: Option<i64>,
        /// At most this many.
        limit: usize,
    },
    /// Closes an account for good: keys revoked, runs and transcripts erased, the balance back to
    /// the issuer, the name erased (the amounts stay under an anonymous id).
    CloseAccount {
        /// The account's name.
        name: String,
    },
    /// The transparency report of the period that began at `period_start` (RFC 3339), or of the
    /// last complete one (made and kept now if it was not yet).
    Report {
        /// When the period began; `None`: the last complete period.
        period_start: Option<String>,
        /// How a report not yet made is made (the config's).
        options: ReportOptions,
    },
}

/// `transparency_epsilon` and `transparency_clip_cu`, as the CLI read them from the config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReportOptions {
    /// ε.
    pub epsilon: f64,
    /// The clipping bound, if set.
    pub clip_cu: Option<u64>,
}

/// An entry of the operator log, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionInfo {
    /// Its number.
    pub seq: i64,
    /// When (RFC 3339, UTC).
    pub at: String,
    /// Who: `cli` or `operator key <id>`.
    pub actor: String,
    /// What.
    pub action: String,
    /// The account it was done to, by its name now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The key, model or group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// How much, in cu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount_cu: Option<u64>,
}

/// An API key, for display. The secret appears only in the reply to its creation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// The key's id.
    pub id: String,
    /// The account it spends from.
    pub account: String,
    /// The full key: only when just created, and never again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// When it was created (RFC 3339, UTC).
    pub created_at: String,
    /// When it was revoked, if it was.
    pub revoked_at: Option<String>,
    /// Its cap per period, in cu, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap_cu: Option<u64>,
    /// What its person calls it, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A restricted model, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelAccessInfo {
    /// The model.
    pub model: String,
    /// Accounts that may use it.
    pub accounts: Vec<String>,
    /// Groups whose members may use it.
    pub groups: Vec<String>,
}

/// A group, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// The group.
    pub group: String,
    /// Its members.
    pub members: Vec<String>,
}

impl Request {
    /// The command's name, for logs (never its arguments: names and amounts stay out of logs).
    pub fn name(&self) -> &'static str {
        match self {
            Request::CreateAccount { .. } => "account create",
            Request::ListAccounts { .. } => "account list",
            Request::ShowAccount { .. } => "account show",
            Request::Grant { .. } => "grant",
            Request::Give { .. } => "give",
            Request::CheckInvariants => "ledger verify",
            Request::CreateKey { .. } => "key create",
            Request::CreateOperatorKey => "admin key create",
            Request::ListKeys { .. } => "key list",
            Request::RevokeKey { .. } => "key revoke",
            Request::SetKeyCap { .. } => "key cap",
            Request::SetModelAccess { .. } => "model access",
            Request::SetGroupMember { .. } => "group",
            Request::ShowAccess => "model rules",
            Request::ListActions { .. } => "audit",
            Request::ExportAccount { .. } => "account export",
            Request::Report { .. } => "report",
            Request::CloseAccount { .. } => "account close",
        }
    }
}

/// A lot, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LotInfo {
    /// What is left, in cu.
    pub remaining_cu: u64,
    /// Where it came from.
    pub source: LotSource,
    /// When it expires (RFC 3339, UTC), if ever.
    pub expires_at: Option<String>,
}

/// A transfer, for display, from one account's point of view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferInfo {
    /// Its id.
    pub id: TransferId,
    /// What it was for.
    pub kind: TransferKind,
    /// Positive when it came in, negative when it went out, in cu.
    pub amount_cu: i64,
    /// The account on the other side.
    pub counterparty: String,
    /// When (RFC 3339, UTC).
    pub at: String,
}

/// An account, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    /// Its id.
    pub id: AccountId,
    /// Its name.
    pub name: String,
    /// Its kind.
    pub kind: AccountKind,
    /// Its balance, in cu.
    pub balance_cu: i64,
    /// Held by open reservations, in cu.
    pub reserved_cu: u64,
    /// Spendable now, in cu.
    pub available_cu: u64,
    /// When the next stipend arrives (RFC 3339, UTC), for persons.
    pub next_grant_at: Option<String>,
    /// How much that stipend is, in cu, for persons.
    pub next_grant_cu: Option<u64>,
    /// The lots making up the balance.
    pub lots: Vec<LotInfo>,
    /// What it spent this period, per sink (one sink per model): counts only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<UsageInfo>,
    /// Recent transfers, newest first (only in `account show`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<TransferInfo>,
}

/// Spending at one sink this period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageInfo {
    /// The sink (`sink:MODEL`).
    pub sink: String,
    /// Calls charged.
    pub requests: u64,
    /// Compute charged, in cu.
    pub charged_cu: u64,
}

/// A posted (or replayed) transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostedInfo {
    /// Its id: pass it again to retry safely.
    pub id: TransferId,
    /// What it was for.
    pub kind: TransferKind,
    /// From.
    pub from: String,
    /// To.
    pub to: String,
    /// How much, in cu.
    pub amount_cu: u64,
    /// True when this id had been posted already and nothing changed.
    pub replayed: bool,
}

/// A command's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// One account.
    Account(AccountInfo),
    /// A page of accounts.
    Accounts {
        /// The accounts.
        accounts: Vec<AccountInfo>,
        /// Pass as `--after` for the next page, if there may be one.
        next_after: Option<u64>,
    },
    /// A transfer.
    Posted(PostedInfo),
    /// One key.
    Key(KeyInfo),
    /// An account's keys.
    Keys {
        /// The keys, oldest first.
        keys: Vec<KeyInfo>,
    },
    /// An account's export (JSON).
    Export {
        /// The export.
        export: serde_json::Value,
    },
    /// An account closed.
    Closed {
        /// The anonymous name its amounts stay under.
        account: String,
        /// What went back to the issuer, in cu.
        returned_cu: u64,
        /// Keys revoked.
        keys_revoked: usize,
        /// Agent runs erased.
        runs_erased: usize,
    },
    /// A period's transparency report, and the privacy budget every report has spent.
    Report {
        /// The report as published.
        published: Box<stipend_web::transparency::Published>,
        /// The sum of every kept report's ε.
        epsilon_spent: f64,
        /// How many reports are kept.
        reports: usize,
    },
    /// Entries of the operator log, newest first.
    Actions {
        /// The entries.
        actions: Vec<ActionInfo>,
        /// Pass as `--before` for the next page, if there may be one.
        next_before: Option<i64>,
    },
    /// The models' access rules and the groups.
    Access {
        /// The restricted models (any other is open to everyone).
        models: Vec<ModelAccessInfo>,
        /// The groups.
        groups: Vec<GroupInfo>,
    },
    /// In-memory invariant violations (empty when all hold).
    Invariants {
        /// The violations.
        violations: Vec<String>,
    },
}

fn account_info(
    ledger: &dyn Books,
    id: AccountId,
    history: usize,
) -> Result<AccountInfo, LedgerError> {
    let view = ledger.view(id)?;
    let person = view.kind == AccountKind::Person;
    let mut info = AccountInfo {
        id,
        name: view.name,
        kind: view.kind,
        balance_cu: view.balance_cu,
        reserved_cu: view.reserved_cu,
        available_cu: view.available_cu,
        next_grant_at: view.next_grant_at_ms.map(format_utc),
        next_grant_cu: person.then(|| ledger.policy().amount_cu()),
        lots: view.lots.iter().map(lot_info).collect(),
        usage: Vec::new(),
        history: Vec::new(),
    };
    for usage in &view.usage {
        info.usage.push(UsageInfo {
            sink: ledger.view(usage.sink)?.name,
            requests: usage.requests,
            charged_cu: usage.charged_cu,
        });
    }
    if history > 0 {
        for transfer in ledger.history(id, history.min(HISTORY_LIMIT_MAX))? {
            info.history.push(transfer_info(ledger, id, &transfer)?);
        }
    }
    Ok(info)
}

fn lot_info(lot: &Lot) -> LotInfo {
    LotInfo {
        remaining_cu: lot.remaining_cu,
        source: lot.source,
        expires_at: lot.expires_at_ms.map(format_utc),
    }
}

fn transfer_info(
    ledger: &dyn Books,
    account: AccountId,
    transfer: &Transfer,
) -> Result<TransferInfo, LedgerError> {
    let incoming = transfer.credit == account;
    let other = if incoming {
        transfer.debit
    } else {
        transfer.credit
    };
    let amount = transfer.amount_cu as i64;
    Ok(TransferInfo {
        id: transfer.id,
        kind: transfer.kind,
        amount_cu: if incoming { amount } else { -amount },
        counterparty: ledger.view(other)?.name,
        at: format_utc(transfer.created_at_ms),
    })
}

fn key_info(record: &stipend_ledger::KeyRecord, account: String, key: Option<String>) -> KeyInfo {
    KeyInfo {
        id: record.id.clone(),
        account,
        key,
        created_at: format_utc(record.created_at_ms),
        revoked_at: record.revoked_at_ms.map(format_utc),
        cap_cu: record.cap.map(|cap| cap.cap_cu),
        name: record.name.clone(),
    }
}

fn access_info(ledger: &dyn Books) -> Result<Response, CommandError> {
    let rules = ledger.store().access_rules()?;
    let name = |id: AccountId| ledger.view(id).map(|view| view.name);
    let mut models = Vec::new();
    for rule in &rules.models {
        models.push(ModelAccessInfo {
            model: rule.model.clone(),
            accounts: rule
                .accounts
                .iter()
                .map(|id| name(*id))
                .collect::<Result<_, _>>()?,
            groups: rule.groups.clone(),
        });
    }
    let mut groups = Vec::new();
    for (group, members) in &rules.groups {
        groups.push(GroupInfo {
            group: group.clone(),
            members: members
                .iter()
                .map(|id| name(*id))
                .collect::<Result<_, _>>()?,
        });
    }
    Ok(Response::Access { models, groups })
}

/// Why a command was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The ledger refused.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] stipend_ledger::StoreError),
    /// No such key.
    #[error("no key with id {0:?}")]
    UnknownKey(String),
    /// A bad group name.
    #[error("{0}")]
    BadGroup(String),
    /// No transparency report can be shown.
    #[error(transparent)]
    Report(#[from] stipend_web::transparency::TransparencyError),
}

/// Runs one command against the ledger and the key ring; a change is written to the operator
/// log (`stipend audit`) once it is made.
pub fn execute(
    ledger: &dyn Books,
    keys: &KeyRing,
    agents: Option<&Agents>,
    request: Request,
) -> Result<Response, CommandError> {
    let asked = request.clone();
    let response = run(ledger, keys, agents, request)?;
    if let Some(action) = operator_action(ledger, &asked, &response) {
        // The change is made: a log that cannot be written is said, not undone.
        if let Err(error) = ledger.store().record_action(&action) {
            tracing::warn!(%error, action = %action.action, "cannot write the operator log");
        }
    }
    Ok(response)
}

/// What the operator log keeps of a command that changed something: accounts by id, never by
/// name, so that a closed account's name leaves the log too.
fn operator_action(
    ledger: &dyn Books,
    request: &Request,
    response: &Response,
) -> Option<stipend_ledger::OperatorAction> {
    let id = |name: &str| ledger.account_id(name).ok();
    let key = |response: &Response| match response {
        Response::Key(key) => Some((key.id.clone(), id(&key.account))),
        _ => None,
    };
    let (action, account, object, amount_cu) = match request {
        Request::CreateAccount { name, .. } => ("account create", id(name), None, None),
        Request::Grant {
            name, amount_cu, ..
        } => ("grant", id(name), None, Some(*amount_cu)),
        Request::Give {
            from,
            to,
            amount_cu,
            ..
        } => (
            "give",
            id(from),
            id(to).map(|to| format!("to account {to}")),
            Some(*amount_cu),
        ),
        Request::CreateKey { .. } => {
            let (key, account) = key(response)?;
            ("key create", account, Some(key), None)
        }
        Request::CreateOperatorKey => (
            "operator key create",
            None,
            key(response).map(|k| k.0),
            None,
        ),
        Request::RevokeKey { .. } => {
            let (key, account) = key(response)?;
            ("key revoke", account, Some(key), None)
        }
        Request::SetKeyCap { cap_cu, .. } => {
            let (key, account) = key(response)?;
            ("key cap", account, Some(key), *cap_cu)
        }
        Request::SetModelAccess { model, .. } => ("model access", None, Some(model.clone()), None),
        Request::SetGroupMember {
            group,
            name,
            member,
        } => (
            if *member { "group add" } else { "group remove" },
            id(name),
            Some(group.clone()),
            None,
        ),
        Request::ListAccounts { .. }
        | Request::ShowAccount { .. }
        | Request::CheckInvariants
        | Request::ListKeys { .. }
        | Request::ShowAccess
        | Request::Report { .. }
        | Request::ListActions { .. } => return None,
        Request::ExportAccount { name } => ("account export", id(name), None, None),
        // By id: the name is gone, and the log never held it.
        Request::CloseAccount { .. } => match response {
            Response::Closed {
                account,
                returned_cu,
                ..
            } => ("account close", id(account), None, Some(*returned_cu)),
            _ => return None,
        },
    };
    Some(stipend_ledger::OperatorAction {
        at_ms: ledger.now_ms(),
        actor: "cli".to_string(),
        action: action.to_string(),
        account,
        object,
        amount_cu,
    })
}

fn run(
    ledger: &dyn Books,
    keys: &KeyRing,
    agents: Option<&Agents>,
    request: Request,
) -> Result<Response, CommandError> {
    match request {
        Request::CreateKey { account } => {
            let id = ledger.account_id(&account)?;
            let kind = ledger.view(id)?.kind;
            if !kind.holds_grants() {
                return Err(LedgerError::WrongKind {
                    account: id,
                    kind,
                    operation: "have an API key",
                }
                .into());
            }
            let new = keys.create(id, ledger.now_ms())?;
            tracing::info!(account = %id, key = %new.record.id, "key created");
            Ok(Response::Key(key_info(&new.record, account, Some(new.key))))
        }
        Request::CreateOperatorKey => {
            let new = keys.create(keys.operator(), ledger.now_ms())?;
            tracing::info!(key = %new.record.id, "operator key created");
            let name = ledger.view(keys.operator())?.name;
            Ok(Response::Key(key_info(&new.record, name, Some(new.key))))
        }
        Request::ListKeys { account } => {
            let id = ledger.account_id(&account)?;
            let records = keys.list(id)?;
            Ok(Response::Keys {
                keys: records
                    .iter()
                    .map(|record| key_info(record, account.clone(), None))
                    .collect(),
            })
        }
        Request::RevokeKey { id } => {
            if !keys.revoke(&id, ledger.now_ms())? {
                return Err(CommandError::UnknownKey(id));
            }
            let record = ledger
                .store()
                .key(&id)?
                .ok_or_else(|| CommandError::UnknownKey(id.clone()))?;
            let account = ledger.view(record.account)?.name;
            tracing::info!(key = %id, "key revoked");
            Ok(Response::Key(key_info(&record, account, None)))
        }
        Request::SetKeyCap { id, cap_cu } => {
            if !ledger.store().set_key_cap(&id, cap_cu)? {
                return Err(CommandError::UnknownKey(id));
            }
            // A running server reads the key again at its next use, with its new cap.
            keys.forget(&id);
            let record = ledger
                .store()
                .key(&id)?
                .ok_or_else(|| CommandError::UnknownKey(id.clone()))?;
            let account = ledger.view(record.account)?.name;
            tracing::info!(key = %id, capped = cap_cu.is_some(), "key cap set");
            Ok(Response::Key(key_info(&record, account, None)))
        }
        Request::SetModelAccess {
            model,
            accounts,
            groups,
        } => {
            for group in &groups {
                stipend_ledger::check_group_name(group).map_err(CommandError::BadGroup)?;
            }
            let mut ids = Vec::with_capacity(accounts.len());
            for name in &accounts {
                ids.push(ledger.account_id(name)?);
            }
            ids.sort();
            ids.dedup();
            let mut groups = groups;
            groups.sort();
            groups.dedup();
            ledger.store().set_model_access(&model, &ids, &groups)?;
            tracing::info!(model = %model, accounts = ids.len(), groups = groups.len(), "model access set");
            access_info(ledger)
        }
        Request::SetGroupMember {
            group,
            name,
            member,
        } => {
            stipend_ledger::check_group_name(&group).map_err(CommandError::BadGroup)?;
            let account = ledger.account_id(&name)?;
            ledger.store().set_group_member(&group, account, member)?;
            tracing::info!(account = %account, member, "group membership set");
            access_info(ledger)
        }
        Request::ShowAccess => access_info(ledger),
        Request::ExportAccount { name } => {
            let id = ledger.account_id(&name)?;
            let view = ledger.view(id)?;
            // The runs, with their transcripts: as the server running them shows them, or else
            // as their journals keep them.
            let runs = match agents {
                Some(agents) => serde_json::to_value(agents.list(id)).unwrap_or_default(),
                None => stipend_web::me::journaled_runs(ledger, id)?,
            };
            let model_of = |sink: AccountId| {
                ledger.view(sink).ok().and_then(|view| {
                    view.name
                        .strip_prefix(stipend_ledger::SINK_NAME_PREFIX)
                        .map(str::to_string)
                })
            };
            let export = stipend_web::me::export(ledger, keys, view, &model_of, runs)?;
            Ok(Response::Export { export })
        }
        Request::CloseAccount { name } => {
            let id = ledger.account_id(&name)?;
            let closed = stipend_web::me::close(ledger, keys, agents, id)?;
            Ok(Response::Closed {
                account: closed.anonymous_name,
                returned_cu: closed.returned_cu,
                keys_revoked: closed.keys_revoked,
                runs_erased: closed.runs_erased,
            })
        }
        Request::Report {
            period_start,
            options,
        } => {
            let options = stipend_web::transparency::TransparencyOptions {
                epsilon: options.epsilon,
                clip_cu: options.clip_cu,
            };
            let body =
                stipend_web::transparency::report(ledger, &options, period_start.as_deref())?;
            let (epsilon_spent, reports) = stipend_web::transparency::budget_spent(ledger)?;
            let published = stipend_web::transparency::read_back(&body)?;
            Ok(Response::Report {
                published: Box::new(published),
                epsilon_spent,
                reports,
            })
        }
        Request::ListActions { before, limit } => {
            let limit = limit.clamp(1, LIST_LIMIT_MAX);
            let actions = ledger.store().actions(before, limit)?;
            let next_before = (actions.len() == limit)
                .then(|| actions.last().map(|(seq, _)| *seq))
                .flatten();
            let mut shown = Vec::with_capacity(actions.len());
            for (seq, action) in actions {
                shown.push(ActionInfo {
                    seq,
                    at: format_utc(action.at_ms),
                    actor: action.actor,
                    action: action.action,
                    // The account's name now (a closed account's is gone).
                    account: action
                        .account
                        .map(|account| ledger.view(account).map(|view| view.name))
                        .transpose()?,
                    object: action.object,
                    amount_cu: action.amount_cu,
                });
            }
            Ok(Response::Actions {
                actions: shown,
                next_before,
            })
        }
        Request::CreateAccount { name, kind } => {
            if !matches!(kind, AccountKind::Person | AccountKind::Pool) {
                return Err(LedgerError::WrongKind {
                    account: AccountId(0),
                    kind,
                    operation: "be created from the command line (use person or pool)",
                }
                .into());
            }
            let id = ledger.create_account(&name, kind)?;
            Ok(Response::Account(account_info(ledger, id, 0)?))
        }
        Request::ListAccounts { after, limit } => {
            let limit = limit.clamp(1, LIST_LIMIT_MAX);
            let views = ledger.views(after.map(AccountId), limit)?;
            let next_after = (views.len() == limit)
                .then(|| views.last().map(|v| v.id.0))
                .flatten();
            let mut accounts = Vec::with_capacity(views.len());
            for view in views {
                accounts.push(account_info(ledger, view.id, 0)?);
            }
            Ok(Response::Accounts {
                accounts,
                next_after,
            })
        }
        Request::ShowAccount { name, history } => {
            let id = ledger.account_id(&name)?;
            Ok(Response::Account(account_info(ledger, id, history)?))
        }
        Request::Grant {
            name,
            amount_cu,
            id,
            expires_at_ms,
        } => {
            let to = ledger.account_id(&name)?;
            let id = id.unwrap_or_else(TransferId::random);
            let posted = ledger.grant(id, to, amount_cu, expires_at_ms)?;
            Ok(Response::Posted(PostedInfo {
                id,
                kind: posted.transfer.kind,
                from: stipend_ledger::ISSUER_NAME.to_string(),
                to: name,
                amount_cu,
                replayed: posted.replayed,
            }))
        }
        Request::Give {
            from,
            to,
            amount_cu,
            id,
        } => {
            let from_id = ledger.account_id(&from)?;
            let to_id = ledger.account_id(&to)?;
            let id = id.unwrap_or_else(TransferId::random);
            let posted = ledger.give(id, from_id, to_id, amount_cu)?;
            Ok(Response::Posted(PostedInfo {
                id,
                kind: posted.transfer.kind,
                from,
                to,
                amount_cu,
                replayed: posted.replayed,
            }))
        }
        Request::CheckInvariants => Ok(Response::Invariants {
            violations: ledger.check_invariants(),
        }),
    }
}

/// `12.5 TFLOP (12500 cu)`.
pub fn amount(cu: i64) -> String {
    format!("{} ({cu} cu)", Flops(cu))
}

/// A transparency report as text: every number with its 95 % error bar.
fn render_report(
    published: &stipend_web::transparency::Published,
    epsilon_spent: f64,
    reports: usize,
    out: &mut String,
) {
    use std::fmt::Write as _;
    let report = &published.report;
    let share = |estimate: &stipend_report::transparency::Estimate<f64>| {
        format!(
            "{:.1} % ± {:.1}",
            estimate.value * 100.0,
            estimate.error95 * 100.0
        )
    };
    let _ = writeln!(
        out,
        "transparency report for {} to {} (made {})",
        published.period_start, published.period_end, published.made_at
    );
    let _ = writeln!(
        out,
        "ε = {}, each person clipped at {} cu; all reports so far: ε = {epsilon_spent} over {reports}",
        report.epsilon, report.clip_cu
    );
    let lines = [
        (
            "people with a stipend",
            format!(
                "{} ± {}",
                report.people_with_stipend.value, report.people_with_stipend.error95
            ),
        ),
        (
            "people active",
            format!(
                "{} ± {}",
                report.people_active.value, report.people_active.error95
            ),
        ),
        (
            "compute granted",
            format!(
                "{} ± {} cu",
                report.granted_cu.value, report.granted_cu.error95
            ),
        ),
        (
            "compute used",
            format!("{} ± {} cu", report.used_cu.value, report.used_cu.error95),
        ),
        (
            "gini",
            format!("{:.3} ± {:.3}", report.gini.value, report.gini.error95),
        ),
        ("top 10 % share", share(&report.top_10pct_share)),
        ("top 1 % share", share(&report.top_1pct_share)),
        (
            "median",
            format!(
                "{} ± {} cu",
                report.median_cu.value, report.median_cu.error95
            ),
        ),
    ];
    for (what, value) in lines {
        let _ = writeln!(out, "  {what:<22} {value}");
    }
    for model in &report.models {
        let _ = writeln!(
            out,
            "  used at {:<14} {} ± {} cu",
            model.model, model.used_cu.value, model.used_cu.error95
        );
    }
    let _ = writeln!(out, "  lorenz (the poorest 0 %, 10 %, …, 100 % used):");
    for (index, point) in report.lorenz.iter().enumerate() {
        let _ = writeln!(out, "    {:>3} %  {}", index * 10, share(point));
    }
}

fn render_account(info: &AccountInfo, out: &mut String) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "account     {} ({}, id {})",
        info.name, info.kind, info.id
    );
    let _ = writeln!(out, "balance     {}", amount(info.balance_cu));
    let _ = writeln!(out, "reserved    {}", amount(info.reserved_cu as i64));
    let _ = writeln!(out, "available   {}", amount(info.available_cu as i64));
    if let (Some(at), Some(cu)) = (&info.next_grant_at, info.next_grant_cu) {
        let _ = writeln!(out, "next grant  {at} (+{})", Flops(cu as i64));
    }
    if !info.lots.is_empty() {
        let _ = writeln!(out, "made of");
        for lot in &info.lots {
            let expiry = lot
                .expires_at
                .as_deref()
                .map_or("never expires".to_string(), |at| format!("expires {at}"));
            let _ = writeln!(
                out,
                "  {:>16}  {:<8} {expiry}",
                Flops(lot.remaining_cu as i64).to_string(),
                format!("{:?}", lot.source).to_lowercase(),
            );
        }
    }
    if !info.usage.is_empty() {
        let _ = writeln!(out, "used this period");
        for usage in &info.usage {
            let _ = writeln!(
                out,
                "  {:<24} {:>6} calls  {}",
                usage.sink,
                usage.requests,
                Flops(usage.charged_cu as i64)
            );
        }
    }
    if !info.history.is_empty() {
        let _ = writeln!(out, "history (newest first)");
        for entry in &info.history {
            let sign = if entry.amount_cu >= 0 { "+" } else { "" };
            let _ = writeln!(
                out,
                "  {}  {:<17} {:>18}  {} {}",
                entry.at,
                entry.kind.as_str(),
                format!("{sign}{}", Flops(entry.amount_cu)),
                if entry.amount_cu >= 0 { "from" } else { "to" },
                entry.counterparty,
            );
        }
    }
}

/// Renders a response for a person at a terminal.
pub fn render(response: &Response) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match response {
        Response::Account(info) => render_account(info, &mut out),
        Response::Accounts {
            accounts,
            next_after,
        } => {
            let _ = writeln!(
                out,
                "{:>6}  {:<24} {:<7} {:>22} {:>22}",
                "id", "name", "kind", "balance", "available"
            );
            for info in accounts {
                let _ = writeln!(
                    out,
                    "{:>6}  {:<24} {:<7} {:>22} {:>22}",
                    info.id.0,
                    info.name,
                    info.kind.as_str(),
                    Flops(info.balance_cu).to_string(),
                    Flops(info.available_cu as i64).to_string(),
                );
            }
            if let Some(after) = next_after {
                let _ = writeln!(out, "(more: --after {after})");
            }
        }
        Response::Posted(posted) => {
            let verb = if posted.replayed {
                "already posted"
            } else {
                "posted"
            };
            let _ = writeln!(
                out,
                "{} {verb}: {} from {} to {}\ntransfer id {} (pass --id {} to retry safely)",
                posted.kind.as_str(),
                amount(posted.amount_cu as i64),
                posted.from,
                posted.to,
                posted.id,
                posted.id,
            );
        }
        Response::Key(key) => match &key.key {
            Some(full) if key.account == stipend_ledger::ISSUER_NAME => {
                let _ = writeln!(
                    out,
                    "Operator key (id {}); it opens the operator's page, /admin, and nothing else.\n\
                     It is shown once, keep it now:\n\n  {full}\n",
                    key.id
                );
            }
            Some(full) => {
                let _ = writeln!(
                    out,
                    "API key for {} (id {}); it is shown once, keep it now:\n\n  {full}\n",
                    key.account, key.id
                );
            }
            None => {
                let state = key
                    .revoked_at
                    .as_deref()
                    .map_or("active".to_string(), |at| format!("revoked {at}"));
                let _ = writeln!(out, "key {} of {}: {state}", key.id, key.account);
            }
        },
        Response::Keys { keys } => {
            if keys.is_empty() {
                let _ = writeln!(out, "no keys");
            }
            for key in keys {
                let state = key
                    .revoked_at
                    .as_deref()
                    .map_or("active".to_string(), |at| format!("revoked {at}"));
                let cap = key
                    .cap_cu
                    .map(|cap| format!("  cap {} a period", Flops(cap as i64)))
                    .unwrap_or_default();
                let name = key
                    .name
                    .as_deref()
                    .map(|name| format!("  {name:?}"))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "{}  created {}  {state}{cap}{name}",
                    key.id, key.created_at
                );
            }
        }
        Response::Export { export } => {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(export).unwrap_or_default()
            );
        }
        Response::Report {
            published,
            epsilon_spent,
            reports,
        } => render_report(published, *epsilon_spent, *reports, &mut out),
        Response::Closed {
            account,
            returned_cu,
            keys_revoked,
            runs_erased,
        } => {
            let _ = writeln!(
                out,
                "closed: now {account}; {} back to the issuer; {keys_revoked} keys revoked; \
                 {runs_erased} agent runs erased",
                amount(*returned_cu as i64)
            );
        }
        Response::Actions { actions, .. } => {
            if actions.is_empty() {
                let _ = writeln!(out, "no operator actions yet");
            }
            for action in actions {
                let mut line = format!(
                    "{:>6}  {}  {}  {}",
                    action.seq, action.at, action.actor, action.action
                );
                if let Some(account) = &action.account {
                    line.push_str(&format!("  {account}"));
                }
                if let Some(object) = &action.object {
                    line.push_str(&format!("  {object}"));
                }
                if let Some(amount_cu) = action.amount_cu {
                    line.push_str(&format!("  {}", Flops(amount_cu as i64)));
                }
                let _ = writeln!(out, "{line}");
            }
        }
        Response::Access { models, groups } => {
            if models.is_empty() {
                let _ = writeln!(out, "every model is open to everyone");
            }
            for model in models {
                let mut who = model.accounts.clone();
                who.extend(model.groups.iter().map(|group| format!("group {group}")));
                let _ = writeln!(out, "{}: only {}", model.model, who.join(", "));
            }
            for group in groups {
                let _ = writeln!(out, "group {}: {}", group.group, group.members.join(", "));
            }
        }
        Response::Invariants { violations } => {
            for violation in violations {
                let _ = writeln!(out, "{violation}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json() {
        let requests = vec![
            Request::CreateAccount {
                name: "ann".into(),
                kind: AccountKind::Pool,
            },
            Request::Grant {
                name: "ann".into(),
                amount_cu: 5,
                id: Some(TransferId(9)),
                expires_at_ms: Some(1),
            },
            Request::CheckInvariants,
        ];
        for request in requests {
            let text = serde_json::to_string(&request).unwrap();
            assert_eq!(
                serde_json::from_str::<Request>(&text).unwrap(),
                request,
                "{text}"
            );
        }
    }

    /// Every reply as the operator reads it and as scripts and the control socket carry it, and
    /// every request as the control socket carries it: a change to either shows here.
    #[test]
    fn the_cli_text_and_the_control_messages_are_stable() {
        let lot = LotInfo {
            remaining_cu: 9_750_000,
            source: LotSource::Stipend,
            expires_at: Some("2026-12-05T00:00:00Z".into()),
        };
        let alice = AccountInfo {
            id: AccountId(2),
            name: "alice".into(),
            kind: AccountKind::Person,
            balance_cu: 10_003_500,
            reserved_cu: 3_500,
            available_cu: 10_000_000,
            next_grant_at: Some("2026-12-05T00:00:00Z".into()),
            next_grant_cu: Some(10_000_000),
            lots: vec![
                lot,
                LotInfo {
                    remaining_cu: 3_500,
                    source: LotSource::Grant,
                    expires_at: None,
                },
            ],
            usage: vec![UsageInfo {
                sink: "sink:smollm2-135m".into(),
                requests: 12,
                charged_cu: 250_000,
            }],
            history: vec![
                TransferInfo {
                    id: TransferId(0xabc123),
                    kind: TransferKind::Grant,
                    amount_cu: 3_500,
                    counterparty: "issuer".into(),
                    at: "2026-12-04T10:00:00Z".into(),
                },
                TransferInfo {
                    id: TransferId(7),
                    kind: TransferKind::Gift,
                    amount_cu: -250,
                    counterparty: "bob".into(),
                    at: "2026-12-04T09:00:00Z".into(),
                },
            ],
        };
        let lab = AccountInfo {
            id: AccountId(4),
            name: "lab".into(),
            kind: AccountKind::Pool,
            balance_cu: 1_000_000,
            reserved_cu: 0,
            available_cu: 1_000_000,
            next_grant_at: None,
            next_grant_cu: None,
            lots: Vec::new(),
            usage: Vec::new(),
            history: Vec::new(),
        };
        let key = KeyInfo {
            id: "k1a2b3".into(),
            account: "alice".into(),
            key: Some("sk-stipend-k1a2b3-secret".into()),
            created_at: "2026-12-04T08:00:00Z".into(),
            revoked_at: None,
            cap_cu: None,
            name: None,
        };
        let revoked = KeyInfo {
            key: None,
            revoked_at: Some("2026-12-04T11:00:00Z".into()),
            ..key.clone()
        };
        let responses = [
            Response::Account(alice.clone()),
            Response::Accounts {
                accounts: vec![alice, lab],
                next_after: Some(4),
            },
            Response::Posted(PostedInfo {
                id: TransferId(0xabc123),
                kind: TransferKind::PoolContribution,
                from: "alice".into(),
                to: "lab".into(),
                amount_cu: 1_000_000,
                replayed: true,
            }),
            Response::Key(key.clone()),
            Response::Key(revoked.clone()),
            Response::Keys {
                keys: vec![
                    key,
                    revoked,
                    KeyInfo {
                        id: "k9".into(),
                        account: "alice".into(),
                        key: None,
                        created_at: "2026-12-05T08:00:00Z".into(),
                        revoked_at: None,
                        cap_cu: Some(1_000),
                        name: Some("the script".into()),
                    },
                ],
            },
            Response::Access {
                models: vec![ModelAccessInfo {
                    model: "big".into(),
                    accounts: vec!["bob".into()],
                    groups: vec!["staff".into()],
                }],
                groups: vec![GroupInfo {
                    group: "staff".into(),
                    members: vec!["alice".into(), "carol".into()],
                }],
            },
            Response::Invariants {
                violations: vec!["account 9: balance -1 cu is negative".into()],
            },
        ];
        let mut out = String::new();
        for response in &responses {
            out.push_str("=== text\n");
            out.push_str(&render(response));
            out.push_str("=== json\n");
            out.push_str(&serde_json::to_string_pretty(response).unwrap());
            out.push('\n');
        }
        let requests = [
            Request::CreateAccount {
                name: "lab".into(),
                kind: AccountKind::Pool,
            },
            Request::ListAccounts {
                after: Some(4),
                limit: 100,
            },
            Request::ShowAccount {
                name: "alice".into(),
                history: 20,
            },
            Request::Grant {
                name: "alice".into(),
                amount_cu: 3_500,
                id: Some(TransferId(0xabc123)),
                expires_at_ms: Some(1_796_000_000_000),
            },
            Request::Give {
                from: "alice".into(),
                to: "lab".into(),
                amount_cu: 250,
                id: None,
            },
            Request::CheckInvariants,
            Request::CreateKey {
                account: "alice".into(),
            },
            Request::ListKeys {
                account: "alice".into(),
            },
            Request::RevokeKey {
                id: "k1a2b3".into(),
            },
        ];
        out.push_str("=== requests\n");
        for request in &requests {
            out.push_str(&serde_json::to_string(request).unwrap());
            out.push('\n');
        }
        insta::assert_snapshot!(out);
    }
}
