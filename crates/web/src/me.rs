//! A person's own data, for them: `GET /v1/me/export` (with their key) answers with everything
//! Stipend holds about their account as JSON: the account, its lots, every transfer it made or
//! received (spends included), its usage counts, its keys' metadata (never a secret) and its
//! agent runs. Nothing of anyone else: another account appears only by name, as the other side
//! of the person's own transfer.
//!
//! `DELETE /v1/me?confirm=NAME` closes the account for good ([`close`], which `stipend account
//! close` runs too): keys revoked, runs and transcripts erased, the balance back to the issuer,
//! the name erased.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use stipend_agents::Agents;
use stipend_gateway::ApiError;
use stipend_gateway::KeyRing;
use stipend_ledger::units::format_utc;
use stipend_ledger::{
    AccountId, AccountKind, AccountView, Books, CLOSED_NAME_PREFIX, LedgerError, TransferId,
};

use crate::limits::{CLOSE_WAIT_MAX, PEOPLE_SCANNED_PAGE};

use crate::Web;

/// `GET /v1/me/export`.
pub(crate) async fn export_route(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    match stipend_gateway::authenticate(&web.gateway, &headers) {
        Ok(account) => download(web, account).await,
        Err(error) => error.into_response(),
    }
}

/// The account's export as a JSON download.
pub(crate) async fn download(web: Arc<Web>, account: AccountId) -> Response {
    let exported = tokio::task::spawn_blocking(move || gather(&web, account)).await;
    match exported {
        Ok(Ok(value)) => {
            let mut response = Json(value).into_response();
            response.headers_mut().insert(
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"stipend-export.json\""),
            );
            response
        }
        Ok(Err(error)) => ApiError::from(error).into_response(),
        Err(_) => ApiError::Internal.into_response(),
    }
}

fn gather(web: &Web, account: AccountId) -> Result<Value, LedgerError> {
    let view = web.gateway.ledger.view(account)?;
    let model_of = |sink: AccountId| {
        web.gateway
            .models
            .values()
            .find(|model| model.sink == sink)
            .map(|model| model.name.clone())
    };
    let agent_runs = match &web.agents {
        Some(agents) => serde_json::to_value(agents.list(account)).unwrap_or(Value::Null),
        None => json!([]),
    };
    export(
        web.books.as_ref(),
        &web.gateway.keys,
        view,
        &model_of,
        agent_runs,
    )
}

/// Everything held about the account `view` shows, as the export's JSON: `model_of` names a
/// sink's model (else the sink's own name is shown), and `agent_runs` are the account's runs
/// (empty where none are known). Shared by `GET /v1/me/export` and `stipend account export`.
pub fn export(
    books: &dyn Books,
    keys: &KeyRing,
    view: AccountView,
    model_of: &dyn Fn(AccountId) -> Option<String>,
    agent_runs: Value,
) -> Result<Value, LedgerError> {
    let account = view.id;
    // Every change decided so far is in the store, so the transfers agree with the balance.
    books.flush()?;
    let store = books.store();
    let mut names: HashMap<AccountId, String> = HashMap::new();
    let mut name_of = |id: AccountId| -> Result<String, LedgerError> {
        if let Some(name) = names.get(&id) {
            return Ok(name.clone());
        }
        let name = books.view(id)?.name;
        names.insert(id, name.clone());
        Ok(name)
    };
    let mut transfers = Vec::new();
    for transfer in store.all_transfers_of(account)? {
        let incoming = transfer.credit == account;
        let other = if incoming {
            transfer.debit
        } else {
            transfer.credit
        };
        let amount = transfer.amount_cu as i64;
        transfers.push(json!({
            "id": transfer.id.to_string(),
            "kind": transfer.kind.as_str(),
            "amount_cu": if incoming { amount } else { -amount },
            "counterparty": name_of(other)?,
            "at": format_utc(transfer.created_at_ms),
        }));
    }
    let mut usage_this_period = Vec::new();
    for usage in &view.usage {
        usage_this_period.push(json!({
            "model": model_of(usage.sink).unwrap_or(name_of(usage.sink)?),
            "requests": usage.requests,
            "charged_cu": usage.charged_cu,
        }));
    }
    let mut usage_by_day = Vec::new();
    for usage in &view.daily {
        usage_by_day.push(json!({
            "day": format_utc(usage.day * stipend_ledger::limits::DAY_MS).chars().take(10).collect::<String>(),
            "model": model_of(usage.sink).unwrap_or(name_of(usage.sink)?),
            "requests": usage.requests,
            "charged_cu": usage.charged_cu,
        }));
    }
    let keys: Vec<Value> = keys
        .list(account)?
        .iter()
        .map(|key| {
            json!({
                "id": key.id,
                "name": key.name,
                "created_at": format_utc(key.created_at_ms),
                "revoked_at": key.revoked_at_ms.map(format_utc),
                "cap_cu": key.cap.map(|cap| cap.cap_cu),
            })
        })
        .collect();
    Ok(json!({
        "object": "export",
        "exported_at": format_utc(books.now_ms()),
        "account": {
            "id": view.id.0,
            "name": view.name,
            "kind": view.kind.as_str(),
            "balance_cu": view.balance_cu,
            "reserved_cu": view.reserved_cu,
            "available_cu": view.available_cu,
            "next_grant_at": view.next_grant_at_ms.map(format_utc),
        },
        "lots": view.lots.iter().map(|lot| json!({
            "source": lot.source.as_str(),
            "remaining_cu": lot.remaining_cu,
            "expires_at": lot.expires_at_ms.map(format_utc),
        })).collect::<Vec<_>>(),
        "transfers": transfers,
        "usage_this_period": usage_this_period,
        "usage_by_day": usage_by_day,
        "keys": keys,
        "agent_runs": agent_runs,
    }))
}

/// The account's agent runs as their journals keep them, for an export made where no server
/// runs them: each run's id and its records (the run's start, its messages and steps, the
/// approvals asked and decided, how it ended), as written.
pub fn journaled_runs(books: &dyn Books, account: AccountId) -> Result<Value, LedgerError> {
    let store = books.store();
    let mut runs = Vec::new();
    for (run, first) in store.journal_starts()? {
        if stipend_agents::journaled_person(&first) != Some(account) {
            continue;
        }
        let records: Vec<Value> = store
            .journal_of(&run)?
            .iter()
            .filter_map(|record| serde_json::from_slice(record).ok())
            .collect();
        runs.push(json!({"id": run, "journal": records}));
    }
    Ok(Value::Array(runs))
}

/// What closing an account did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The anonymous name the account's amounts stay under.
    pub anonymous_name: String,
    /// What went back to the issuer, in cu.
    pub returned_cu: u64,
    /// Keys revoked.
    pub keys_revoked: usize,
    /// Agent runs whose transcripts were erased.
    pub runs_erased: usize,
}

/// Closes `account` for good: its keys revoked, its agent runs stopped and their transcripts
/// erased (through `agents` where they run here, and from the journal whichever server wrote
/// them), its whole balance back to the issuer (`Books::close`), and its name and its keys'
/// names erased (`Books::erase_names`). The ledger keeps its amounts under an anonymous id, so
/// double entry holds. Closing a closed account again finishes what a failure interrupted.
/// Blocking: call it on a blocking thread inside the runtime when `agents` is given.
pub fn close(
    books: &dyn Books,
    keys: &KeyRing,
    agents: Option<&Agents>,
    account: AccountId,
) -> Result<Closed, LedgerError> {
    let view = books.view(account)?;
    if !matches!(
        view.kind,
        AccountKind::Person | AccountKind::Pool | AccountKind::Closed
    ) {
        return Err(LedgerError::WrongKind {
            account,
            kind: view.kind,
            operation: "be closed",
        });
    }
    // Calls in flight now: refused before anything changes (the person can try again).
    if view.reserved_cu > 0 {
        return Err(LedgerError::AccountBusy {
            account,
            reserved_cu: view.reserved_cu,
        });
    }
    // No key opens anything of it from now on.
    let now_ms = books.now_ms();
    let mut keys_revoked = 0;
    for key in keys.list(account)? {
        if key.revoked_at_ms.is_none() && keys.revoke(&key.id, now_ms)? {
            keys_revoked += 1;
        }
    }
    // Runs stop and give back what they hold before the balance is taken.
    let mut runs_erased = 0;
    if let Some(agents) = agents {
        let handle = tokio::runtime::Handle::current();
        for run in agents.list(account) {
            handle
                .block_on(agents.delete(account, &run.id))
                .map_err(|error| LedgerError::Unavailable {
                    reason: format!("run {} could not be deleted: {error}", run.id),
                })?;
            runs_erased += 1;
        }
    }
    let store = books.store();
    for (run, first) in store.journal_starts()? {
        if stipend_agents::journaled_person(&first) == Some(account) {
            store.journal_erase(&run)?;
            runs_erased += 1;
        }
    }
    let prefix = stipend_agents::agent_account_prefix(account);
    for (run_account, _) in store.accounts_named_like(&prefix, PEOPLE_SCANNED_PAGE)? {
        let held = books.view(run_account)?;
        if held.balance_cu > 0 {
            return Err(LedgerError::AccountBusy {
                account,
                reserved_cu: held.balance_cu as u64,
            });
        }
    }
    // No call can start now; one that started before the keys went ends within its deadline.
    let waited = std::time::Instant::now();
    let closure = loop {
        match books.close(account) {
            Err(LedgerError::AccountBusy { .. }) if waited.elapsed() < CLOSE_WAIT_MAX => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            closed => break closed?,
        }
    };
    let anonymous_name = if view.name.starts_with(CLOSED_NAME_PREFIX) {
        view.name
    } else {
        let name = format!("{CLOSED_NAME_PREFIX}{:032x}", TransferId::random().0);
        books.erase_names(account, &name)?;
        name
    };
    tracing::info!(account = %account, keys_revoked, runs_erased, "account closed and its names erased");
    Ok(Closed {
        anonymous_name,
        returned_cu: closure.map_or(0, |posted| posted.transfer.amount_cu),
        keys_revoked,
        runs_erased,
    })
}

/// Closes the person's own account if `confirm` is its name (else `None`, and nothing
/// happens), and writes it to the operator log (actor `the person`).
pub(crate) fn close_confirmed(
    web: &Web,
    account: AccountId,
    confirm: &str,
) -> Result<Option<Closed>, LedgerError> {
    let view = web.books.view(account)?;
    if confirm.trim() != view.name {
        return Ok(None);
    }
    let closed = close(
        web.books.as_ref(),
        &web.gateway.keys,
        web.agents.as_deref(),
        account,
    )?;
    crate::operator::record(
        web.books.as_ref(),
        "the person",
        "account close",
        Some(account),
        None,
        Some(closed.returned_cu),
    );
    Ok(Some(closed))
}

/// `?confirm=` on `DELETE /v1/me`: the account's own name, typed again.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct Confirm {
    confirm: Option<String>,
}

/// `DELETE /v1/me?confirm=NAME`: the person closes their own account. Without the name typed
/// again, nothing happens and the answer says what to send.
pub(crate) async fn close_route(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    confirm: Result<axum::extract::Query<Confirm>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(axum::extract::Query(confirm)) = confirm else {
        return ApiError::param("confirm", "The query string is not `confirm=NAME`.")
            .into_response();
    };
    let account = match stipend_gateway::authenticate(&web.gateway, &headers) {
        Ok(account) => account,
        Err(error) => return error.into_response(),
    };
    let closed = {
        let web = Arc::clone(&web);
        let confirm = confirm.confirm.unwrap_or_default();
        tokio::task::spawn_blocking(move || close_confirmed(&web, account, &confirm)).await
    };
    match closed {
        Ok(Ok(Some(closed))) => Json(json!({
            "object": "account.closed",
            "account": closed.anonymous_name,
            "returned_cu": closed.returned_cu,
            "keys_revoked": closed.keys_revoked,
            "runs_erased": closed.runs_erased,
        }))
        .into_response(),
        Ok(Ok(None)) => ApiError::param(
            "confirm",
            "Closing your account cannot be undone: your keys are revoked, your agent runs and \
             their transcripts erased, your name erased, and what is left of your compute goes \
             back to the issuer. To go ahead, send DELETE /v1/me?confirm= with your account's \
             name (GET /v1/budget shows it)."
                .to_string(),
        )
        .into_response(),
        Ok(Err(LedgerError::AccountBusy { .. })) => crate::api::AdminError::Conflict(
            "Your account holds compute for calls or agent runs in flight; close it once they end."
                .to_string(),
        )
        .into_response(),
        Ok(Err(error)) => ApiError::from(error).into_response(),
        Err(_) => ApiError::Internal.into_response(),
    }
}
