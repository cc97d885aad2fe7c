//! A person's page: sign in with a key; see the budget, what it buys, what was used this period,
//! the lots and recent transfers; create and revoke keys; give compute to another account.
//!
//! Every form answers with a redirect to `/` (post, redirect, get), which shows the outcome
//! once, so a reload never sends a form twice; a gift carries an id made when the page was drawn,
//! so even a form sent twice gives once.

use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use stipend_gateway::keys::{self, KeyError};
use stipend_ledger::limits::{DAY_MS, USAGE_DAYS_KEPT};
use stipend_ledger::units::{describe_tokens, format_utc, parse_amount_cu};
use stipend_ledger::{
    AccountId, AccountKind, AccountView, Flops, KeyRecord, LedgerError, Transfer, TransferId,
};

use crate::chart::{self, Bar, Column};
use crate::limits::{HISTORY_SHOWN, KEY_BYTES_MAX, KEY_NAME_CHARS_MAX, KEYS_SHOWN};
use crate::session::{self, Flash, Role, Session};
use crate::{
    SignInForm, Web, clear_cookie, page, refusal, respond, sign_in_form, signed_in_redirect,
};

/// `GET /`: the person's page, or the sign-in form.
pub(crate) async fn home(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let Some(session) = web.sessions.take(&headers) else {
        return sign_in_page(StatusCode::OK, None);
    };
    if session.role == Role::Operator {
        return Redirect::to("/admin").into_response();
    }
    if let Err(response) = key_stands(&web, &headers, &session) {
        return *response;
    }
    let gathered = {
        let web = Arc::clone(&web);
        let account = session.account;
        tokio::task::spawn_blocking(move || gather(&web, account)).await
    };
    match gathered {
        Ok(Ok(seen)) => respond(StatusCode::OK, person_page(&web, &seen, session.flash)),
        Ok(Err(error)) => unavailable(&error),
        Err(_) => refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The page could not be drawn.",
        ),
    }
}

/// Everything the person's page shows, read in one go (on a blocking thread: the store may be
/// asked).
struct Seen {
    view: AccountView,
    stipend_cu: u64,
    period: String,
    now_ms: i64,
    keys: Vec<KeyRecord>,
    history: Vec<(Transfer, String)>,
}

fn gather(web: &Web, account: AccountId) -> Result<Seen, LedgerError> {
    let view = web.gateway.ledger.view(account)?;
    let mut keys = web.gateway.keys.list(account)?;
    // The newest first, as many as the page holds.
    keys.reverse();
    keys.truncate(KEYS_SHOWN);
    let mut history = Vec::new();
    for transfer in web.books.history(account, HISTORY_SHOWN)? {
        let other = if transfer.credit == account {
            transfer.debit
        } else {
            transfer.credit
        };
        let name = web.books.view(other)?.name;
        history.push((transfer, name));
    }
    let policy = web.gateway.ledger.policy();
    Ok(Seen {
        view,
        stipend_cu: policy.amount_cu(),
        period: stipend_ledger::units::format_duration(policy.period()),
        now_ms: web.books.now_ms(),
        keys,
        history,
    })
}

/// Whether the key that opened the session still stands; if not, the session ends and the
/// sign-in form says why.
fn key_stands(web: &Web, headers: &HeaderMap, session: &Session) -> Result<(), Box<Response>> {
    match web.gateway.keys.account_of(&session.key_id) {
        Ok(account) if account == session.account => Ok(()),
        Ok(_)
        | Err(KeyError::Invalid | KeyError::Revoked | KeyError::Missing | KeyError::Operator) => {
            web.sessions.close(headers);
            let mut response = sign_in_page(
                StatusCode::OK,
                Some("The key you signed in with was revoked; sign in with another."),
            );
            clear_cookie(&mut response, headers);
            Err(Box::new(response))
        }
        Err(error) => Err(Box::new(unavailable_key(&error))),
    }
}

fn sign_in_page(status: StatusCode, message: Option<&str>) -> Response {
    let form = SignInForm {
        title: "Sign in",
        intro: html! { "Sign in with one of your API keys (it starts with " code { "sk-stipend-" } ")." },
        action: "/signin",
        label: "API key",
    };
    sign_in_form(status, form, message)
}

#[derive(Deserialize)]
pub(crate) struct SignIn {
    key: String,
}

/// `POST /signin`: a key opens a session.
pub(crate) async fn sign_in(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    form: Result<Form<SignIn>, FormRejection>,
) -> Response {
    if let Err(refused) = session::same_origin(&headers) {
        return refusal(StatusCode::FORBIDDEN, &refused.to_string());
    }
    let Ok(Form(form)) = form else {
        return sign_in_page(StatusCode::BAD_REQUEST, Some("Enter an API key."));
    };
    let key = form.key.trim();
    let checked = if key.len() > KEY_BYTES_MAX {
        Err(KeyError::Invalid)
    } else {
        let (ring, key) = (web.gateway.keys.clone(), key.to_string());
        tokio::task::spawn_blocking(move || ring.authenticate(&key))
            .await
            .unwrap_or(Err(KeyError::Invalid))
    };
    let account = match checked {
        Ok(account) => account,
        Err(KeyError::Store(error)) => return unavailable_key(&KeyError::Store(error)),
        Err(KeyError::Operator) => {
            return sign_in_page(
                StatusCode::UNAUTHORIZED,
                Some("That is an operator key: it opens /admin, not a person's page."),
            );
        }
        Err(_) => {
            return sign_in_page(
                StatusCode::UNAUTHORIZED,
                Some("That key was not accepted: it is unknown, mistyped or revoked."),
            );
        }
    };
    let Some((key_id, _)) = keys::parse(key) else {
        return sign_in_page(StatusCode::UNAUTHORIZED, Some("That key was not accepted."));
    };
    let token = match web.sessions.open(account, key_id.to_string(), Role::Person) {
        Ok(token) => token,
        Err(_) => return refusal(StatusCode::SERVICE_UNAVAILABLE, "No session could be made."),
    };
    tracing::info!(account = %account, key = %key_id, "signed in to the web page");
    signed_in_redirect(&web, &headers, &token, "/")
}

/// `POST /signout`: the session ends and the browser forgets it.
pub(crate) async fn sign_out(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    if let Err(refused) = session::same_origin(&headers) {
        return refusal(StatusCode::FORBIDDEN, &refused.to_string());
    }
    web.sessions.close(&headers);
    let mut response = Redirect::to("/").into_response();
    clear_cookie(&mut response, &headers);
    response
}

/// The session of a form's request, once the form is known to come from this server's page
/// and its key still stands; else the response that says why not.
pub(crate) fn signed_in(web: &Web, headers: &HeaderMap) -> Result<Session, Box<Response>> {
    if let Err(refused) = session::same_origin(headers) {
        return Err(Box::new(refusal(
            StatusCode::FORBIDDEN,
            &refused.to_string(),
        )));
    }
    let Some(session) = web
        .sessions
        .take(headers)
        .filter(|session| session.role == Role::Person)
    else {
        return Err(Box::new(sign_in_page(
            StatusCode::UNAUTHORIZED,
            Some("Your session has ended; sign in again."),
        )));
    };
    key_stands(web, headers, &session)?;
    Ok(session)
}

#[derive(Deserialize)]
pub(crate) struct KeyName {
    #[serde(default)]
    name: String,
}

/// A key's name as its person typed it: trimmed, at most [`KEY_NAME_CHARS_MAX`] characters, no
/// control characters; empty is no name.
fn key_name(typed: &str) -> Result<Option<String>, String> {
    let name = typed.trim();
    if name.is_empty() {
        return Ok(None);
    }
    if name.chars().count() > KEY_NAME_CHARS_MAX || name.chars().any(char::is_control) {
        return Err(format!(
            "A key's name is at most {KEY_NAME_CHARS_MAX} characters, on one line."
        ));
    }
    Ok(Some(name.to_string()))
}

/// The name a key form gave, or the redirect whose page says why it is refused.
fn typed_key_name(
    web: &Web,
    headers: &HeaderMap,
    form: Result<Form<KeyName>, FormRejection>,
) -> Result<Option<String>, Box<Response>> {
    match form.map(|Form(form)| key_name(&form.name)) {
        Ok(Ok(name)) => Ok(name),
        Ok(Err(message)) => {
            web.sessions.flash(headers, Flash::Refused(message));
            Err(Box::new(Redirect::to("/").into_response()))
        }
        Err(_) => Ok(None),
    }
}

/// `POST /keys`: a new key for the person, with the name they gave it, shown once.
pub(crate) async fn create_key(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    form: Result<Form<KeyName>, FormRejection>,
) -> Response {
    let session = match signed_in(&web, &headers) {
        Ok(session) => session,
        Err(response) => return *response,
    };
    let name = match typed_key_name(&web, &headers, form) {
        Ok(name) => name,
        Err(response) => return *response,
    };
    let created = {
        let web = Arc::clone(&web);
        tokio::task::spawn_blocking(move || {
            web.gateway
                .keys
                .create_named(session.account, name, web.books.now_ms())
        })
        .await
    };
    let flash = match created {
        Ok(Ok(new)) => {
            tracing::info!(account = %session.account, key = %new.record.id, "key created on the web page");
            Flash::NewKey(new.key)
        }
        _ => Flash::Refused("No key could be created; try again shortly.".to_string()),
    };
    web.sessions.flash(&headers, flash);
    Redirect::to("/").into_response()
}

/// Whether `id` is a working key of `account`: another's key is not found, as one that does not
/// exist.
fn owns_working_key(
    web: &Web,
    account: AccountId,
    id: &str,
) -> Result<bool, stipend_ledger::StoreError> {
    Ok(web
        .gateway
        .keys
        .list(account)?
        .iter()
        .any(|key| key.id == id && key.revoked_at_ms.is_none()))
}

/// `POST /keys/{id}/revoke`: one of the person's keys stops working. Revoking the key this
/// session was opened with ends the session.
pub(crate) async fn revoke_key(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let session = match signed_in(&web, &headers) {
        Ok(session) => session,
        Err(response) => return *response,
    };
    let revoked = {
        let (web, id) = (Arc::clone(&web), id.clone());
        tokio::task::spawn_blocking(move || -> Result<bool, stipend_ledger::StoreError> {
            if !owns_working_key(&web, session.account, &id)? {
                return Ok(false);
            }
            web.gateway.keys.revoke(&id, web.books.now_ms())
        })
        .await
    };
    let flash = match revoked {
        Ok(Ok(true)) => {
            tracing::info!(account = %session.account, key = %id, "key revoked on the web page");
            if id == session.key_id {
                web.sessions.close(&headers);
                let mut response = sign_in_page(
                    StatusCode::OK,
                    Some("Key revoked. It was the key you signed in with, so you are signed out."),
                );
                clear_cookie(&mut response, &headers);
                return response;
            }
            Flash::Done(format!("Key {id} is revoked: it no longer works."))
        }
        Ok(Ok(false)) => Flash::Refused(format!("You have no working key {id}.")),
        _ => Flash::Refused("The key could not be revoked; try again shortly.".to_string()),
    };
    web.sessions.flash(&headers, flash);
    Redirect::to("/").into_response()
}

/// `POST /keys/{id}/name`: one of the person's keys is named (or, empty, unnamed).
pub(crate) async fn rename_key(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    form: Result<Form<KeyName>, FormRejection>,
) -> Response {
    let session = match signed_in(&web, &headers) {
        Ok(session) => session,
        Err(response) => return *response,
    };
    let name = match typed_key_name(&web, &headers, form) {
        Ok(name) => name,
        Err(response) => return *response,
    };
    let renamed = {
        let (web, id, name) = (Arc::clone(&web), id.clone(), name.clone());
        tokio::task::spawn_blocking(move || -> Result<bool, stipend_ledger::StoreError> {
            if !owns_working_key(&web, session.account, &id)? {
                return Ok(false);
            }
            web.books.store().set_key_name(&id, name.as_deref())
        })
        .await
    };
    let flash = match renamed {
        Ok(Ok(true)) => Flash::Done(match name {
            Some(name) => format!("Key {id} is now called {name:?}."),
            None => format!("Key {id} has no name now."),
        }),
        Ok(Ok(false)) => Flash::Refused(format!("You have no working key {id}.")),
        _ => Flash::Refused("The key could not be renamed; try again shortly.".to_string()),
    };
    web.sessions.flash(&headers, flash);
    Redirect::to("/").into_response()
}

#[derive(Deserialize)]
pub(crate) struct Give {
    to: String,
    amount: String,
    id: String,
}

/// `POST /give`: compute from the person to another person or a pool.
pub(crate) async fn give(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    form: Result<Form<Give>, FormRejection>,
) -> Response {
    let session = match signed_in(&web, &headers) {
        Ok(session) => session,
        Err(response) => return *response,
    };
    let flash = match form {
        Err(_) => Flash::Refused("Say whom to give to and how much.".to_string()),
        Ok(Form(form)) => give_flash(&web, session.account, form).await,
    };
    web.sessions.flash(&headers, flash);
    Redirect::to("/").into_response()
}

async fn give_flash(web: &Arc<Web>, from: AccountId, form: Give) -> Flash {
    let to_name = form.to.trim().to_string();
    let amount_cu = match parse_amount_cu(form.amount.trim()) {
        Ok(0) => return Flash::Refused("Give more than nothing.".to_string()),
        Ok(amount_cu) => amount_cu,
        Err(error) => {
            return Flash::Refused(format!(
                "{:?} is not an amount ({error}); write e.g. 2 TFLOP.",
                form.amount.trim()
            ));
        }
    };
    let Some(id) = TransferId::parse(form.id.trim()) else {
        return Flash::Refused("The form is damaged; reload the page.".to_string());
    };
    let given = {
        let (web, to_name) = (Arc::clone(web), to_name.clone());
        tokio::task::spawn_blocking(move || {
            let to = web.books.account_id(&to_name)?;
            let kind = web.books.view(to)?.kind;
            // A gift goes to a person or a pool, never to the ledger's own accounts nor to an
            // agent run (whose budget is its person's to set).
            if !matches!(kind, AccountKind::Person | AccountKind::Pool) {
                return Err(LedgerError::UnknownAccount { name: to_name });
            }
            web.books.give(id, from, to, amount_cu)
        })
        .await
    };
    match given {
        Ok(Ok(posted)) if posted.replayed => {
            Flash::Done("That gift was already given; nothing more was sent.".to_string())
        }
        Ok(Ok(_)) => {
            tracing::info!(account = %from, transfer = %id, "gift given on the web page");
            Flash::Done(format!("Gave {} to {to_name}.", Flops(amount_cu as i64)))
        }
        Ok(Err(LedgerError::UnknownAccount { .. })) => {
            Flash::Refused(format!("Nobody is named {to_name:?}."))
        }
        Ok(Err(
            error @ (LedgerError::InsufficientBalance { .. }
            | LedgerError::SameAccount
            | LedgerError::InvalidAmount { .. }
            | LedgerError::BalanceLimit { .. }
            | LedgerError::TooManyLots { .. }
            | LedgerError::WrongKind { .. }
            | LedgerError::TransferConflict { .. }),
        )) => Flash::Refused(format!("Not given: {error}.")),
        _ => Flash::Refused("Not given: the ledger is unavailable; try again shortly.".to_string()),
    }
}

fn unavailable(error: &LedgerError) -> Response {
    tracing::warn!(%error, "a person's page could not be read");
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "Your budget cannot be read right now; try again shortly.",
    )
}

fn unavailable_key(error: &KeyError) -> Response {
    tracing::warn!(%error, "a key could not be checked");
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        "Keys cannot be checked right now; try again shortly.",
    )
}

/// A UTC day as a date: `2026-12-05`.
fn day_label(day: i64) -> String {
    format_utc(day * DAY_MS).chars().take(10).collect()
}

/// A moment as a person reads it: `2029-12-17 00:00 UTC`.
fn when(ms: i64) -> String {
    let utc = format_utc(ms);
    match (utc.get(..10), utc.get(11..16)) {
        (Some(day), Some(time)) => format!("{day} {time} UTC"),
        _ => utc,
    }
}

/// How far off a moment is, in words: "in 3 d 4 h", "in 12 min".
fn from_now(at_ms: i64, now_ms: i64) -> String {
    let seconds = (at_ms - now_ms).max(0) / 1_000;
    let (days, hours, minutes) = (
        seconds / 86_400,
        seconds % 86_400 / 3_600,
        seconds % 3_600 / 60,
    );
    if days > 0 {
        format!("in {days} d {hours} h")
    } else if hours > 0 {
        format!("in {hours} h {minutes} min")
    } else if minutes > 0 {
        format!("in {minutes} min")
    } else {
        "in under a minute".to_string()
    }
}

fn person_page(web: &Web, seen: &Seen, flash: Option<Flash>) -> Markup {
    let view = &seen.view;
    // The models this person may use, and any other they were charged for before it was closed
    // to them.
    let models: Vec<_> = web
        .gateway
        .models
        .values()
        .filter(|model| {
            web.gateway.access.allows(&model.name, view.id)
                || view.daily.iter().any(|usage| usage.sink == model.sink)
        })
        .collect();
    let usage: Vec<(String, u64, u64)> = models
        .iter()
        .map(|model| {
            let used = view.usage.iter().find(|usage| usage.sink == model.sink);
            (
                model.name.clone(),
                used.map_or(0, |usage| usage.requests),
                used.map_or(0, |usage| usage.charged_cu),
            )
        })
        .collect();
    let bars: Vec<Bar> = usage
        .iter()
        .map(|(model, _, charged_cu)| Bar {
            label: model.clone(),
            value: *charged_cu,
            text: Flops(*charged_cu as i64).to_string(),
        })
        .collect();
    let used_cu: u64 = usage.iter().map(|(_, _, charged_cu)| charged_cu).sum();
    // The last days, oldest first, each with what every model was charged on it.
    let today = seen.now_ms.div_euclid(DAY_MS);
    let days: Vec<(i64, Vec<u64>, u64)> = (today - (USAGE_DAYS_KEPT - 1)..=today)
        .map(|day| {
            let mut requests = 0;
            let parts = models
                .iter()
                .map(|model| {
                    view.daily
                        .iter()
                        .filter(|usage| usage.day == day && usage.sink == model.sink)
                        .map(|usage| {
                            requests += usage.requests;
                            usage.charged_cu
                        })
                        .sum()
                })
                .collect();
            (day, parts, requests)
        })
        .collect();
    let columns: Vec<Column> = days
        .iter()
        .map(|(day, parts, _)| Column {
            label: day_label(*day),
            parts: parts.clone(),
        })
        .collect();
    let tallest_cu = days
        .iter()
        .map(|(_, parts, _)| parts.iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    let series: Vec<String> = models.iter().map(|model| model.name.clone()).collect();
    let used_days: Vec<&(i64, Vec<u64>, u64)> = days
        .iter()
        .filter(|(_, parts, _)| parts.iter().any(|part| *part > 0))
        .collect();
    page(
        "Your budget",
        Some(&view.name),
        html! {
            @match &flash {
                Some(Flash::Done(text)) => section.card.wide { p.flash.done #flash { (text) } },
                Some(Flash::Refused(text)) => section.card.wide { p.flash.refused #flash { (text) } },
                Some(Flash::NewKey(key)) => section.card.wide {
                    div.flash.key #flash {
                        strong { "Your new key" }
                        code #new-key { (key) }
                        "Copy it now: it is shown this once and never again."
                    }
                },
                None => {}
            }
            section.card #budget aria-labelledby="budget-title" {
                h2 #budget-title { "Available now" }
                p.big #available data-cu=(view.available_cu) title={(view.available_cu) " GFLOP exactly"} { (Flops(view.available_cu as i64)) }
                @for model in &models {
                    p.muted.buys { (describe_tokens(view.available_cu, model.price_completion_cu, &model.name)) }
                }
                dl.figures {
                    dt { "Balance" }
                    dd #balance data-cu=(view.balance_cu) { (Flops(view.balance_cu)) }
                    dt { "Held for calls in flight" }
                    dd #reserved data-cu=(view.reserved_cu) { (Flops(view.reserved_cu as i64)) }
                    @if view.kind == AccountKind::Person {
                        dt { "Next stipend" }
                        dd #next-stipend {
                            (Flops(seen.stipend_cu as i64))
                            @if let Some(at_ms) = view.next_grant_at_ms {
                                ", " (from_now(at_ms, seen.now_ms)) " ("
                                time datetime=(format_utc(at_ms)) { (when(at_ms)) } ")"
                            }
                        }
                        dt { "Every" }
                        dd { (seen.period) }
                    }
                }
            }
            section.card #usage aria-labelledby="usage-title" {
                h2 #usage-title { "Used this period" }
                p.muted { (Flops(used_cu as i64)) " in all"
                    @if web.agents.is_some() { "; your agents' spending is counted with each run" } }
                (chart::bars(
                    "usage-chart",
                    "Compute used this period, per model",
                    &format!(
                        "A bar per model: {}.",
                        usage.iter()
                            .map(|(model, requests, charged_cu)| format!(
                                "{model}, {} in {requests} calls", Flops(*charged_cu as i64)))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    &bars,
                ))
                div.table-wrap {
                    table #usage-table {
                        caption { "The same numbers" }
                        thead { tr { th { "Model" } th.num { "Calls" } th.num { "Compute" } } }
                        tbody {
                            @for (model, requests, charged_cu) in &usage {
                                tr data-model=(model) {
                                    td { (model) }
                                    td.num.calls { (requests) }
                                    td.num.compute data-cu=(charged_cu) { (Flops(*charged_cu as i64)) }
                                }
                            }
                        }
                    }
                }
            }
            @if let Some(agents) = &web.agents {
                section.card.wide #agents aria-labelledby="agents-title" {
                    (crate::agents::section(agents, view.id))
                }
                script src=(crate::SCRIPT_PATH) defer {}
            }
            section.card.wide #daily aria-labelledby="daily-title" {
                h2 #daily-title { "Used per day" }
                p.muted { "The last " (USAGE_DAYS_KEPT) " days, in UTC." }
                (chart::columns(
                    "daily-chart",
                    "Compute used per day, per model",
                    &format!(
                        "A column per day from {} to {}, stacked by model; the tallest is {}. \
                         The table below has the numbers.",
                        day_label(today - (USAGE_DAYS_KEPT - 1)),
                        day_label(today),
                        Flops(tallest_cu as i64)
                    ),
                    &series,
                    &columns,
                    &Flops(tallest_cu as i64).to_string(),
                ))
                div.table-wrap {
                    table #daily-table {
                        caption { "Days with any use" }
                        thead { tr {
                            th { "Day" }
                            @for model in &models { th.num { (model.name) } }
                            th.num { "Calls" }
                        } }
                        tbody {
                            @for (day, parts, requests) in &used_days {
                                tr data-day=(day_label(*day)) {
                                    td { (day_label(*day)) }
                                    @for part in parts { td.num data-cu=(part) { (Flops(*part as i64)) } }
                                    td.num.calls { (requests) }
                                }
                            }
                            @if used_days.is_empty() {
                                tr { td colspan=(models.len() + 2) { "Nothing used in these days." } }
                            }
                        }
                    }
                }
            }
            section.card #give aria-labelledby="give-title" {
                h2 #give-title { "Give compute" }
                p.muted { "To another person, or to a pool you share. A gift keeps the expiry it had." }
                form.stack method="post" action="/give" {
                    input type="hidden" name="id" value=(TransferId::random());
                    label { "To (their account name)"
                        input #give-to type="text" name="to" required maxlength="128" autocomplete="off";
                    }
                    label { "How much (e.g. 2 TFLOP)"
                        input #give-amount type="text" name="amount" required maxlength="64" autocomplete="off";
                    }
                    button #give-submit type="submit" { "Give" }
                }
            }
            section.card #keys aria-labelledby="keys-title" {
                h2 #keys-title { "Your keys" }
                form.row method="post" action="/keys" {
                    label { "Name (optional)"
                        input #key-name type="text" name="name" maxlength=(KEY_NAME_CHARS_MAX) autocomplete="off" placeholder="laptop, a script…";
                    }
                    button #create-key type="submit" { "Create a key" }
                }
                div.table-wrap {
                    table #keys-table {
                        thead { tr { th { "Name" } th { "Key id" } th { "Created" } th { "Cap a period" } th { "State" } } }
                        tbody {
                            @for key in &seen.keys {
                                tr data-key=(key.id) {
                                    td.name {
                                        @if key.revoked_at_ms.is_none() {
                                            form.inline method="post" action={"/keys/" (key.id) "/name"} {
                                                input.rename type="text" name="name" value=[key.name.as_deref()]
                                                    maxlength=(KEY_NAME_CHARS_MAX) aria-label="The key's name" autocomplete="off";
                                                button.quiet.rename-submit type="submit" { "Rename" }
                                            }
                                        } @else {
                                            (key.name.as_deref().unwrap_or(""))
                                        }
                                    }
                                    td { code { (key.id) } }
                                    td { (when(key.created_at_ms)) }
                                    td.cap {
                                        @match key.cap {
                                            Some(cap) => (Flops(cap.cap_cu as i64)),
                                            None => "none",
                                        }
                                    }
                                    td {
                                        @if let Some(at_ms) = key.revoked_at_ms {
                                            span.state-revoked { "revoked " (when(at_ms)) }
                                        } @else {
                                            form.inline method="post" action={"/keys/" (key.id) "/revoke"} {
                                                button.danger.revoke type="submit" { "Revoke" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section.card.wide #lots aria-labelledby="lots-title" {
                h2 #lots-title { "What your balance is made of" }
                div.table-wrap {
                    table {
                        thead { tr { th { "From" } th.num { "Left" } th { "Expires" } } }
                        tbody {
                            @for lot in &view.lots {
                                tr {
                                    td { (lot.source.as_str()) }
                                    td.num { (Flops(lot.remaining_cu as i64)) }
                                    td { (lot.expires_at_ms.map(when).unwrap_or_else(|| "never".to_string())) }
                                }
                            }
                        }
                    }
                }
                h2 { "Recent transfers" }
                p.muted { "Stipends, grants and gifts; calls are counted above." }
                div.table-wrap {
                    table #history {
                        thead { tr { th { "When" } th { "What" } th { "With" } th.num { "Amount" } } }
                        tbody {
                            @for (transfer, other) in &seen.history {
                                @let incoming = transfer.credit == view.id;
                                tr {
                                    td { (when(transfer.created_at_ms)) }
                                    td { (transfer.kind.as_str()) }
                                    td { (other) }
                                    td.num { @if incoming { "+" } @else { "−" } (Flops(transfer.amount_cu as i64)) }
                                }
                            }
                        }
                    }
                }
            }
            section.card.wide #your-data aria-labelledby="data-title" {
                h2 #data-title { "Your data" }
                p { a #export href="/export" download="stipend-export.json" { "Download everything Stipend holds about you" } " (JSON: your account, every transfer, your usage, your keys' names, your agent runs)." }
                p { "How equally compute is shared, for everyone: " a href="/transparency" { "the transparency report" } "." }
                details #close {
                    summary { "Close your account" }
                    p { "This cannot be undone. Your keys stop working, your agent runs and their transcripts are erased, what is left of your compute goes back to the issuer, and your name is erased. The ledger keeps only the amounts, under an anonymous id." }
                    form.stack method="post" action="/close" {
                        label { "Type your account's name, " strong { (view.name) } ", to close it"
                            input #close-confirm type="text" name="confirm" required maxlength="128" autocomplete="off";
                        }
                        button.danger #close-submit type="submit" { "Close my account for good" }
                    }
                }
            }
        },
    )
}

#[derive(Deserialize)]
pub(crate) struct CloseForm {
    #[serde(default)]
    confirm: String,
}

/// `GET /export`: the person's export (`GET /v1/me/export`'s), downloaded from their page.
pub(crate) async fn export(State(web): State<Arc<Web>>, headers: HeaderMap) -> Response {
    let session = match signed_in(&web, &headers) {
        Ok(session) => session,
        Err(response) => return *response,
    };
    crate::me::download(web, session.account).await
}

/// `POST /close`: the person closes their account, their name typed again; then they are signed
/// out and told what happened.
pub(crate) async fn close(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    form: Result<Form<CloseForm>, FormRejection>,
) -> Response {
    let session = match signed_in(&web, &headers) {
        Ok(session) => session,
        Err(response) => return *response,
    };
    let confirm = form.map(|Form(form)| form.confirm).unwrap_or_default();
    let closed = {
        let web = Arc::clone(&web);
        tokio::task::spawn_blocking(move || {
            crate::me::close_confirmed(&web, session.account, &confirm)
        })
        .await
    };
    let flash = match closed {
        Ok(Ok(Some(_))) => {
            web.sessions.close(&headers);
            let mut response = sign_in_page(
                StatusCode::OK,
                Some("Your account is closed: your keys no longer work, and your name is erased."),
            );
            clear_cookie(&mut response, &headers);
            return response;
        }
        Ok(Ok(None)) => Flash::Refused(
            "Nothing was closed: type your account's name exactly to close it.".to_string(),
        ),
        Ok(Err(LedgerError::AccountBusy { .. })) => Flash::Refused(
            "Your account holds compute for calls or agent runs in flight; close it once they end."
                .to_string(),
        ),
        _ => Flash::Refused("Your account could not be closed; try again shortly.".to_string()),
    };
    web.sessions.flash(&headers, flash);
    Redirect::to("/").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_said_in_words() {
        assert_eq!(from_now(0, 0), "in under a minute");
        assert_eq!(from_now(90_000, 0), "in 1 min");
        assert_eq!(from_now(3_600_000 * 5 + 60_000 * 3, 0), "in 5 h 3 min");
        assert_eq!(from_now(86_400_000 * 2 + 3_600_000, 0), "in 2 d 1 h");
        assert_eq!(from_now(-5, 0), "in under a minute");
        assert_eq!(when(1_891_987_200_000), "2029-12-15 00:00 UTC");
        assert_eq!(day_label(1_891_987_200_000 / DAY_MS), "2029-12-15");
    }
}
