//! The operator's JSON API under `/v1/admin`, for scripts, with an operator key as the bearer
//! (the same credential as the operator's page): accounts (list with paging, show, create,
//! grant), keys (list, create, revoke), and this period's distribution of compute. Errors are
//! OpenAI-shaped, and a refused request changes nothing.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use stipend_gateway::keys::KeyError;
use stipend_ledger::units::{format_utc, parse_amount_cu, parse_duration};
use stipend_ledger::{AccountKind, AccountView, KeyRecord, LedgerError, StoreError, TransferId};

use crate::Web;
use crate::limits::{ACCESS_SUBJECTS_MAX, ADMIN_LIST_MAX, KEY_NAME_CHARS_MAX};
use crate::operator;

/// The admin API's routes.
pub(crate) fn router() -> Router<Arc<Web>> {
    Router::new()
        .route(
            "/v1/admin/accounts",
            get(list_accounts).post(create_account),
        )
        .route("/v1/admin/accounts/{name}", get(show_account))
        .route("/v1/admin/accounts/{name}/grants", post(grant))
        .route(
            "/v1/admin/accounts/{name}/keys",
            get(list_keys).post(create_key),
        )
        .route("/v1/admin/keys/{id}", delete(revoke_key))
        .route("/v1/admin/keys/{id}/cap", put(set_key_cap))
        .route("/v1/admin/distribution", get(distribution))
        .route("/v1/admin/access", get(access_rules))
        .route("/v1/admin/audit", get(audit))
        .route("/v1/admin/models/{model}/access", put(set_model_access))
        .route(
            "/v1/admin/groups/{group}/members/{name}",
            put(add_member).delete(remove_member),
        )
}

/// Why the admin API refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    /// No operator key, or not a good one.
    #[error("{0}")]
    Unauthorized(String),
    /// The request is malformed.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    /// No such account or key.
    #[error("{0}")]
    NotFound(String),
    /// The ledger refused what was asked (a name taken, a transfer id reused, …).
    #[error("{0}")]
    Conflict(String),
    /// The ledger or the key store could not be reached.
    #[error("the ledger is unavailable; try again shortly")]
    Unavailable,
}

impl From<LedgerError> for AdminError {
    fn from(error: LedgerError) -> AdminError {
        match error {
            LedgerError::UnknownAccount { .. } => AdminError::NotFound(error.to_string()),
            LedgerError::InvalidName { .. } | LedgerError::InvalidAmount { .. } => {
                AdminError::Invalid {
                    message: error.to_string(),
                    param: None,
                }
            }
            LedgerError::AccountExists { .. }
            | LedgerError::NameConfusable { .. }
            | LedgerError::TransferConflict { .. }
            | LedgerError::BalanceLimit { .. }
            | LedgerError::TooManyLots { .. }
            | LedgerError::WrongKind { .. } => AdminError::Conflict(error.to_string()),
            other => {
                tracing::warn!(error = %other, "admin API: the ledger refused");
                AdminError::Unavailable
            }
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(error: StoreError) -> AdminError {
        tracing::warn!(%error, "admin API: the key store failed");
        AdminError::Unavailable
    }
}

impl AdminError {
    /// The status, error type, code and parameter it is answered with.
    fn parts(
        &self,
    ) -> (
        StatusCode,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
    ) {
        match self {
            AdminError::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                None,
            ),
            AdminError::Invalid { param, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                *param,
            ),
            AdminError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("not_found"),
                None,
            ),
            AdminError::Conflict(_) => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("conflict"),
                None,
            ),
            AdminError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("ledger_unavailable"),
                None,
            ),
        }
    }

    /// The status it is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        self.parts().0
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, kind, code, param) = self.parts();
        (
            status,
            Json(json!({"error": {
                "message": self.to_string(), "type": kind, "param": param, "code": code,
            }})),
        )
            .into_response()
    }
}

/// A request made with an operator key; anything else is refused (401) before its handler runs.
pub(crate) struct Operator {
    /// Who, for the operator log: `operator key <id>`.
    actor: String,
}

impl FromRequestParts<Arc<Web>> for Operator {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, web: &Arc<Web>) -> Result<Operator, AdminError> {
        let mut values = parts.headers.get_all("authorization").iter();
        let presented = values
            .next()
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                AdminError::Unauthorized(
                    "no operator key was given; send it as `Authorization: Bearer sk-stipend-…` \
                     (`stipend admin key create` makes one)"
                        .to_string(),
                )
            })?;
        if values.next().is_some() {
            return Err(AdminError::Invalid {
                message: "The request has more than one Authorization header; send one key."
                    .to_string(),
                param: None,
            });
        }
        let key_text = presented.to_string();
        let (ring, presented) = (web.gateway.keys.clone(), presented.to_string());
        match tokio::task::spawn_blocking(move || ring.authenticate_operator(&presented)).await {
            Ok(Ok(())) => Ok(Operator {
                actor: format!(
                    "operator key {}",
                    stipend_gateway::keys::parse(&key_text)
                        .map(|(id, _)| id)
                        .unwrap_or("?")
                ),
            }),
            Ok(Err(KeyError::Store(error))) => Err(AdminError::from(error)),
            Ok(Err(KeyError::Revoked)) => Err(AdminError::Unauthorized(
                "the operator key was revoked".to_string(),
            )),
            Ok(Err(_)) => Err(AdminError::Unauthorized(
                "the key is not a valid operator key (a person's key never opens the admin API)"
                    .to_string(),
            )),
            Err(_) => Err(AdminError::Unavailable),
        }
    }
}

/// Runs blocking work (the books and the key store may wait on the disk or the database).
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AdminError> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or(Err(AdminError::Unavailable))
}

/// A JSON body of the shape `T`, or a 400 that says why not.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, AdminError> {
    serde_json::from_slice(bytes).map_err(|error| AdminError::Invalid {
        message: format!("The body is not the JSON this endpoint takes: {error}."),
        param: None,
    })
}

fn reply(result: Result<Value, AdminError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(error) => error.into_response(),
    }
}

fn created(result: Result<Value, AdminError>) -> Response {
    match result {
        Ok(value) => (StatusCode::CREATED, Json(value)).into_response(),
        Err(error) => error.into_response(),
    }
}

/// An account as the admin API shows it: balances and counts, never content.
fn account_json(web: &Web, view: &AccountView) -> Value {
    let usage: Vec<Value> = web
        .gateway
        .models
        .values()
        .filter_map(|model| {
            let used = view.usage.iter().find(|usage| usage.sink == model.sink)?;
            Some(json!({
                "model": model.name,
                "requests": used.requests,
                "charged_cu": used.charged_cu,
            }))
        })
        .collect();
    json!({
        "object": "account",
        "id": view.id.0,
        "name": view.name,
        "kind": view.kind.as_str(),
        "balance_cu": view.balance_cu,
        "reserved_cu": view.reserved_cu,
        "available_cu": view.available_cu,
        "next_grant_at": view.next_grant_at_ms.map(format_utc),
        "used_this_period_cu": view.usage.iter().map(|usage| usage.charged_cu).sum::<u64>(),
        "usage_this_period": usage,
    })
}

fn key_json(record: &KeyRecord, account: &str, key: Option<&str>) -> Value {
    let mut value = json!({
        "object": "key",
        "id": record.id,
        "account": account,
        "created_at": format_utc(record.created_at_ms),
        "revoked_at": record.revoked_at_ms.map(format_utc),
        "cap_cu": record.cap.map(|cap| cap.cap_cu),
        "name": record.name,
    });
    if let Some(key) = key {
        value["key"] = json!(key);
    }
    value
}

#[derive(Deserialize)]
struct Page {
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/admin/accounts?after=ID&limit=N`: people and pools in id order.
async fn list_accounts(
    _: Operator,
    State(web): State<Arc<Web>>,
    Query(page): Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(100).clamp(1, ADMIN_LIST_MAX);
    reply(
        blocking(move || {
            let (views, next_after) = operator::accounts(web.books.as_ref(), page.after, limit)?;
            let data: Vec<Value> = views.iter().map(|view| account_json(&web, view)).collect();
            Ok(json!({"object": "list", "data": data, "next_after": next_after}))
        })
        .await,
    )
}

/// `GET /v1/admin/accounts/{name}`.
async fn show_account(
    _: Operator,
    State(web): State<Arc<Web>>,
    Path(name): Path<String>,
) -> Response {
    reply(
        blocking(move || {
            let id = web.books.account_id(&name)?;
            Ok(account_json(&web, &web.books.view(id)?))
        })
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    name: String,
    #[serde(default = "person")]
    kind: String,
}

fn person() -> String {
    "person".to_string()
}

/// `POST /v1/admin/accounts` `{"name": …, "kind": "person" | "pool"}`: 201 with the account.
async fn create_account(operator: Operator, State(web): State<Arc<Web>>, bytes: Bytes) -> Response {
    let new: NewAccount = match body(&bytes) {
        Ok(new) => new,
        Err(error) => return error.into_response(),
    };
    let kind = match new.kind.as_str() {
        "person" => AccountKind::Person,
        "pool" => AccountKind::Pool,
        _ => {
            return AdminError::Invalid {
                message: format!("kind must be \"person\" or \"pool\", not {:?}.", new.kind),
                param: Some("kind"),
            }
            .into_response();
        }
    };
    created(
        blocking(move || {
            let view =
                operator::create_account(web.books.as_ref(), &operator.actor, &new.name, kind)?;
            Ok(account_json(&web, &view))
        })
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGrant {
    /// `"5 PFLOP"`, or a number of cu.
    amount: Value,
    /// A transfer id (up to 32 hex digits), so that a retry grants once; random if absent.
    id: Option<String>,
    /// When the grant expires, from now (`"30d"`); never if absent.
    expires_in: Option<String>,
}

/// `POST /v1/admin/accounts/{name}/grants` `{"amount": "5 PFLOP", "id"?, "expires_in"?}`:
/// compute from the issuer, idempotent by `id`.
async fn grant(
    operator: Operator,
    State(web): State<Arc<Web>>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let new: NewGrant = match body(&bytes) {
        Ok(new) => new,
        Err(error) => return error.into_response(),
    };
    let checked = (|| {
        let amount_cu = match &new.amount {
            Value::Number(number) => number.as_u64().ok_or_else(|| AdminError::Invalid {
                message: "amount must be a whole number of cu, or a text like \"5 PFLOP\"."
                    .to_string(),
                param: Some("amount"),
            })?,
            Value::String(text) => parse_amount_cu(text).map_err(|error| AdminError::Invalid {
                message: format!("amount {text:?}: {error}."),
                param: Some("amount"),
            })?,
            _ => {
                return Err(AdminError::Invalid {
                    message: "amount must be a number of cu or a text like \"5 PFLOP\"."
                        .to_string(),
                    param: Some("amount"),
                });
            }
        };
        if amount_cu == 0 {
            return Err(AdminError::Invalid {
                message: "amount must be more than nothing.".to_string(),
                param: Some("amount"),
            });
        }
        let id = match &new.id {
            None => TransferId::random(),
            Some(text) => TransferId::parse(text).ok_or_else(|| AdminError::Invalid {
                message: format!("id {text:?} is not a transfer id (up to 32 hex digits)."),
                param: Some("id"),
            })?,
        };
        let expires_in = match &new.expires_in {
            None => None,
            Some(text) => match parse_duration(text) {
                Ok(duration) if !duration.is_zero() => Some(duration),
                _ => {
                    return Err(AdminError::Invalid {
                        message: format!("expires_in {text:?} is not a duration like \"30d\"."),
                        param: Some("expires_in"),
                    });
                }
            },
        };
        Ok((amount_cu, id, expires_in))
    })();
    let (amount_cu, id, expires_in) = match checked {
        Ok(checked) => checked,
        Err(error) => return error.into_response(),
    };
    reply(
        blocking(move || {
            let expires_at_ms =
                expires_in.map(|duration| web.books.now_ms() + duration.as_millis() as i64);
            let (to, posted) = operator::grant(
                web.books.as_ref(),
                &operator.actor,
                &name,
                amount_cu,
                id,
                expires_at_ms,
            )?;
            Ok(json!({
                "object": "transfer",
                "id": id.to_string(),
                "kind": posted.transfer.kind.as_str(),
                "from": stipend_ledger::ISSUER_NAME,
                "to": to,
                "amount_cu": amount_cu,
                "replayed": posted.replayed,
            }))
        })
        .await,
    )
}

/// `GET /v1/admin/accounts/{name}/keys`: ids and state, never secrets.
async fn list_keys(_: Operator, State(web): State<Arc<Web>>, Path(name): Path<String>) -> Response {
    reply(
        blocking(move || {
            let id = web.books.account_id(&name)?;
            let records = web.gateway.keys.list(id)?;
            let data: Vec<Value> = records
                .iter()
                .map(|record| key_json(record, &name, None))
                .collect();
            Ok(json!({"object": "list", "data": data}))
        })
        .await,
    )
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewKey {
    /// What the key is called, if anything.
    name: Option<String>,
}

/// `POST /v1/admin/accounts/{name}/keys` (optionally `{"name": "laptop"}`): 201 with the new
/// key, shown this once.
async fn create_key(
    operator: Operator,
    State(web): State<Arc<Web>>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Response {
    let new: NewKey = if bytes.is_empty() {
        NewKey::default()
    } else {
        match body(&bytes) {
            Ok(new) => new,
            Err(error) => return error.into_response(),
        }
    };
    let key_name = new
        .name
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty());
    if key_name.as_ref().is_some_and(|name| {
        name.chars().count() > KEY_NAME_CHARS_MAX || name.chars().any(char::is_control)
    }) {
        return AdminError::Invalid {
            message: format!(
                "A key's name is at most {KEY_NAME_CHARS_MAX} characters, on one line."
            ),
            param: Some("name"),
        }
        .into_response();
    }
    created(
        blocking(move || {
            let id = web.books.account_id(&name)?;
            let kind = web.books.view(id)?.kind;
            if !kind.holds_grants() {
                return Err(AdminError::Conflict(format!(
                    "{name:?} is a {kind} account and cannot have an API key"
                )));
            }
            let new = web
                .gateway
                .keys
                .create_named(id, key_name, web.books.now_ms())?;
            tracing::info!(account = %id, key = %new.record.id, "key created through the admin API");
            operator::record(
                web.books.as_ref(),
                &operator.actor,
                "key create",
                Some(id),
                Some(new.record.id.clone()),
                None,
            );
            Ok(key_json(&new.record, &name, Some(&new.key)))
        })
        .await,
    )
}

/// `DELETE /v1/admin/keys/{id}`: the key stops working at once.
async fn revoke_key(
    operator: Operator,
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
) -> Response {
    reply(
        blocking(move || {
            if !web.gateway.keys.revoke(&id, web.books.now_ms())? {
                return Err(AdminError::NotFound(format!("no key with id {id:?}")));
            }
            let record = web
                .books
                .store()
                .key(&id)?
                .ok_or_else(|| AdminError::NotFound(format!("no key with id {id:?}")))?;
            let account = web.books.view(record.account)?.name;
            tracing::info!(key = %id, "key revoked through the admin API");
            operator::record(
                web.books.as_ref(),
                &operator.actor,
                "key revoke",
                Some(record.account),
                Some(id.clone()),
                None,
            );
            Ok(key_json(&record, &account, None))
        })
        .await,
    )
}

/// `GET /v1/admin/distribution`: how this period's compute is spread across people, exactly.
async fn distribution(_: Operator, State(web): State<Arc<Web>>) -> Response {
    reply(
        blocking(move || {
            let distribution = operator::distribution(web.books.as_ref())?;
            let policy = web.gateway.ledger.policy();
            let now_ms = web.books.now_ms();
            let period_start_ms = policy.period_index(now_ms) * policy.period().as_millis() as i64;
            Ok(json!({
                "object": "distribution",
                "period_start": format_utc(period_start_ms),
                "people_with_stipend": distribution.people,
                "people_active": distribution.people_active,
                "used_cu": distribution.used_cu as u64,
                "gini": distribution.gini,
                "lorenz": distribution.lorenz,
                "top_1pct_share": distribution.top_1pct_share,
                "top_10pct_share": distribution.top_10pct_share,
                "median_cu": distribution.median_cu,
            }))
        })
        .await,
    )
}

/// The access rules with names: each restricted model's accounts and groups, each group's
/// members.
fn access_json(web: &Web, rules: &stipend_ledger::AccessRules) -> Result<Value, AdminError> {
    let name = |id: stipend_ledger::AccountId| -> Result<String, AdminError> {
        Ok(web.books.view(id)?.name)
    };
    let mut models = Vec::new();
    for model in web.gateway.models.keys() {
        match rules.models.iter().find(|rule| &rule.model == model) {
            None => models.push(json!({"model": model, "restricted": false})),
            Some(rule) => {
                let accounts = rule
                    .accounts
                    .iter()
                    .map(|id| name(*id))
                    .collect::<Result<Vec<_>, _>>()?;
                models.push(json!({
                    "model": model, "restricted": true,
                    "accounts": accounts, "groups": rule.groups,
                }));
            }
        }
    }
    let mut groups = Vec::new();
    for (group, members) in &rules.groups {
        let members = members
            .iter()
            .map(|id| name(*id))
            .collect::<Result<Vec<_>, _>>()?;
        groups.push(json!({"group": group, "members": members}));
    }
    Ok(json!({"object": "access", "models": models, "groups": groups}))
}

/// `GET /v1/admin/access`: which models are restricted, to whom, and who is in each group.
async fn access_rules(_: Operator, State(web): State<Arc<Web>>) -> Response {
    reply(
        blocking(move || {
            let rules = web.books.store().access_rules()?;
            access_json(&web, &rules)
        })
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetAccess {
    #[serde(default)]
    accounts: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
}

/// A group's name, or the 400 that says why not.
fn check_group(name: &str) -> Result<(), AdminError> {
    stipend_ledger::check_group_name(name).map_err(|message| AdminError::Invalid {
        message: format!("{message}."),
        param: Some("groups"),
    })
}

/// `PUT /v1/admin/models/{model}/access` `{"accounts": [...], "groups": [...]}`: only these
/// accounts and the members of these groups may use the model from now on; both empty opens
/// it to everyone again. Anyone else asking for it is told it does not exist (404).
async fn set_model_access(
    operator: Operator,
    State(web): State<Arc<Web>>,
    Path(model): Path<String>,
    bytes: Bytes,
) -> Response {
    let set: SetAccess = match body(&bytes) {
        Ok(set) => set,
        Err(error) => return error.into_response(),
    };
    if !web.gateway.models.contains_key(&model) {
        return AdminError::NotFound(format!("no model named {model:?}")).into_response();
    }
    if set.accounts.len() + set.groups.len() > ACCESS_SUBJECTS_MAX {
        return AdminError::Invalid {
            message: format!(
                "At most {ACCESS_SUBJECTS_MAX} accounts and groups a model; use a group."
            ),
            param: None,
        }
        .into_response();
    }
    for group in &set.groups {
        if let Err(error) = check_group(group) {
            return error.into_response();
        }
    }
    reply(
        blocking(move || {
            let mut accounts = Vec::with_capacity(set.accounts.len());
            for name in &set.accounts {
                accounts.push(web.books.account_id(name)?);
            }
            accounts.sort();
            accounts.dedup();
            let mut groups = set.groups;
            groups.sort();
            groups.dedup();
            let store = web.books.store();
            store.set_model_access(&model, &accounts, &groups)?;
            web.gateway.access.reload()?;
            tracing::info!(model = %model, accounts = accounts.len(), groups = groups.len(), "model access set");
            operator::record(
                web.books.as_ref(),
                &operator.actor,
                "model access",
                None,
                Some(model.clone()),
                None,
            );
            access_json(&web, &store.access_rules()?)
        })
        .await,
    )
}

/// `PUT /v1/admin/groups/{group}/members/{name}`: the account joins the group.
async fn add_member(
    operator: Operator,
    state: State<Arc<Web>>,
    path: Path<(String, String)>,
) -> Response {
    membership(operator, state, path, true).await
}

/// `DELETE /v1/admin/groups/{group}/members/{name}`: the account leaves the group.
async fn remove_member(
    operator: Operator,
    state: State<Arc<Web>>,
    path: Path<(String, String)>,
) -> Response {
    membership(operator, state, path, false).await
}

async fn membership(
    operator: Operator,
    State(web): State<Arc<Web>>,
    Path((group, name)): Path<(String, String)>,
    member: bool,
) -> Response {
    if let Err(error) = check_group(&group) {
        return error.into_response();
    }
    reply(
        blocking(move || {
            let account = web.books.account_id(&name)?;
            let changed = web
                .books
                .store()
                .set_group_member(&group, account, member)?;
            web.gateway.access.reload()?;
            tracing::info!(account = %account, member, changed, "group membership set");
            if changed {
                operator::record(
                    web.books.as_ref(),
                    &operator.actor,
                    if member { "group add" } else { "group remove" },
                    Some(account),
                    Some(group.clone()),
                    None,
                );
            }
            Ok(
                json!({"object": "group_member", "group": group, "account": name,
                      "member": member, "changed": changed}),
            )
        })
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetCap {
    /// `"1 TFLOP"`, a number of cu, or null for no cap.
    cap: Value,
}

/// `PUT /v1/admin/keys/{id}/cap` `{"cap": "1 TFLOP"}` (or `null`): the most the key may spend
/// in a period from now on, whatever its account holds; a call past it is refused with 429
/// `insufficient_quota`.
async fn set_key_cap(
    operator: Operator,
    State(web): State<Arc<Web>>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Response {
    let set: SetCap = match body(&bytes) {
        Ok(set) => set,
        Err(error) => return error.into_response(),
    };
    let cap_cu = match &set.cap {
        Value::Null => None,
        Value::Number(number) => match number.as_u64() {
            Some(cap) => Some(cap),
            None => {
                return AdminError::Invalid {
                    message: "cap must be a whole number of cu, a text like \"1 TFLOP\", or null."
                        .to_string(),
                    param: Some("cap"),
                }
                .into_response();
            }
        },
        Value::String(text) => match parse_amount_cu(text) {
            Ok(cap) => Some(cap),
            Err(error) => {
                return AdminError::Invalid {
                    message: format!("cap {text:?}: {error}."),
                    param: Some("cap"),
                }
                .into_response();
            }
        },
        _ => {
            return AdminError::Invalid {
                message: "cap must be a number of cu, a text like \"1 TFLOP\", or null."
                    .to_string(),
                param: Some("cap"),
            }
            .into_response();
        }
    };
    reply(
        blocking(move || {
            let store = web.books.store();
            if !store.set_key_cap(&id, cap_cu)? {
                return Err(AdminError::NotFound(format!("no key with id {id:?}")));
            }
            // The next call with the key reads it again, with its new cap.
            web.gateway.keys.forget(&id);
            let record = store
                .key(&id)?
                .ok_or_else(|| AdminError::NotFound(format!("no key with id {id:?}")))?;
            let account = web.books.view(record.account)?.name;
            tracing::info!(key = %id, capped = cap_cu.is_some(), "key cap set");
            operator::record(
                web.books.as_ref(),
                &operator.actor,
                "key cap",
                Some(record.account),
                Some(id.clone()),
                cap_cu,
            );
            Ok(key_json(&record, &account, None))
        })
        .await,
    )
}

#[derive(Deserialize)]
struct AuditPage {
    before: Option<i64>,
    limit: Option<usize>,
}

/// `GET /v1/admin/audit?before=N&limit=N`: the operator log, newest first: who changed what,
/// when, to which account (by its name now), how much.
async fn audit(
    _: Operator,
    State(web): State<Arc<Web>>,
    Query(page): Query<AuditPage>,
) -> Response {
    let limit = page.limit.unwrap_or(100).clamp(1, ADMIN_LIST_MAX);
    reply(
        blocking(move || {
            let actions = web.books.store().actions(page.before, limit)?;
            let next_before = (actions.len() == limit)
                .then(|| actions.last().map(|(seq, _)| *seq))
                .flatten();
            let mut data = Vec::with_capacity(actions.len());
            for (seq, action) in actions {
                let account = match action.account {
                    Some(id) => Some(web.books.view(id)?.name),
                    None => None,
                };
                data.push(json!({
                    "seq": seq,
                    "at": format_utc(action.at_ms),
                    "actor": action.actor,
                    "action": action.action,
                    "account": account,
                    "object": action.object,
                    "amount_cu": action.amount_cu,
                }));
            }
            Ok(json!({"object": "list", "data": data, "next_before": next_before}))
        })
        .await,
    )
}
