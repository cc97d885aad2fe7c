//! A person's own data, for them: `GET /v1/me/export` (with their key) answers with everything
//! Stipend holds about their account as JSON: the account, its lots, every transfer it made or
//! received (spends included), its usage counts, its keys' metadata (never a secret) and its
//! agent runs. Nothing of anyone else: another account appears only by name, as the other side
//! of the person's own transfer.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use stipend_gateway::ApiError;
use stipend_gateway::KeyRing;
use stipend_ledger::units::format_utc;
use stipend_ledger::{AccountId, AccountView, Books, LedgerError};

use crate::Web;

/// `GET /v1/me/export`.
pub(crate) async fn export_route(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let account = match stipend_gateway::authenticate(&web.gateway, &headers) {
        Ok(account) => account,
        Err(error) => return error.into_response(),
    };
    let exported = {
        let web = Arc::clone(&web);
        tokio::task::spawn_blocking(move || gather(&web, account)).await
    };
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
